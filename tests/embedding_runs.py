"""Runs' embeddings files for the index's tests: written as the pipeline writes them, from
prediction rows of a real catalog's prediction schema."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.embedding import EmbeddingSpec
from transforms.catalog import Catalog
from transforms.embeddings import (
    EMBEDDING_FILE_PREFIX,
    EmbeddingsOrigin,
    embedding_row,
    embedding_schema,
    write_embeddings,
)
from transforms.predictions import prediction_schema

STYLES = ("Baroque", "Cubism", "Impressionism")
DIMENSION = 8
ORIGIN = EmbeddingsOrigin("test-model-v1", EmbeddingSpec(DIMENSION, "test_features"))


def museum_catalog(labelled: bool = True) -> Catalog:
    """A catalog with a title and an accession number beside its URIs (and labels)."""
    extra = (pa.field("title", pa.string()), pa.field("accession", pa.int64()))
    return Catalog("catalog.csv", "csv", ("catalog.csv",), "uri",
                   "style" if labelled else None, extra)  # fmt: skip


def unit_rows(n: int, dimension: int = DIMENSION, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_run(
    folder: Path,
    vectors: np.ndarray,
    uris: Sequence[str] | None = None,
    *,
    origin: EmbeddingsOrigin = ORIGIN,
    catalog: Catalog | None = None,
    shards: int = 1,
) -> Path:
    """A run's output folder with `vectors` as its embeddings, in `shards` files."""
    catalog = catalog or museum_catalog()
    uris = uris or [f"images/painting-{i:05d}.jpg" for i in range(len(vectors))]
    schema = embedding_schema(prediction_schema(catalog), origin)
    rows = [
        embedding_row(prediction_row(i, uri, catalog), vector)
        for i, (uri, vector) in enumerate(zip(uris, vectors, strict=True))
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for shard, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        name = f"{EMBEDDING_FILE_PREFIX}-{shard:05d}-of-{shards:05d}.parquet"
        write_embeddings(str(folder / name), [rows[i] for i in part], schema)
    return folder


def prediction_row(i: int, uri: str, catalog: Catalog) -> dict:
    """A predicted row, as transforms.predictions.prediction_row makes one."""
    row = {"uri": uri, "title": f"Painting {i}", "accession": 1000 + i}
    if catalog.has_labels:
        row["label"] = STYLES[(i + 1) % len(STYLES)]
    return {
        **row,
        "style": STYLES[i % len(STYLES)],
        "confidence": 0.5 + (i % 5) / 10,
        "top_k_styles": list(STYLES),
        "top_k_probabilities": [0.5, 0.3, 0.2],
        "model": ORIGIN.model_id,
        "error": None,
    }
