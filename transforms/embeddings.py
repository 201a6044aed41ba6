"""A run's embeddings: `embeddings-*.parquet` in its output folder, beside its predictions.

One row per catalog row that was predicted (error rows have no embedding): the columns that
key the prediction (`uri`, the catalog's own columns under the names and types the
predictions give them, `label` where the catalog has labels), the predicted `style` and its
`confidence`, and the `embedding`, a fixed-size list of float16, L2-normalised. The schema's
metadata, under the key b"artstyle", is a JSON object naming the bundle (`model`) and what
its vector is (`embedding`: its dimension and kind): files of different models never meet
in one index.

The pipeline writes these files with Beam, from the prediction rows it already makes
(`embedding_schema` of its prediction schema, `embedding_row` of each row); everything else
here is Beam-free, so that `python -m pipeline.index` reads them without loading Beam.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.embedding import STORED_DTYPE, EmbeddingSpec, EmbeddingSpecError, unit_vectors

EMBEDDING_FILE_PREFIX = "embeddings"  # Beam's shards: embeddings-00000-of-00004.parquet
EMBEDDING_FILES = f"{EMBEDDING_FILE_PREFIX}-*.parquet"
EMBEDDING_COLUMN = "embedding"
METADATA_KEY = b"artstyle"
# Prediction columns an embedding row leaves out: the top k and the error belong to the
# prediction (every embedding row is a row that was predicted), the model is in the metadata.
PREDICTION_ONLY_COLUMNS = frozenset({"top_k_styles", "top_k_probabilities", "model", "error"})
READ_BATCH_ROWS = 65_536  # rows read at a time


class EmbeddingsError(ValueError):
    """A run folder's embeddings cannot be used: one line naming the folder or the file."""


@dataclass(frozen=True)
class EmbeddingsOrigin:
    """What made a file's vectors: the bundle's id and its embedding's description."""

    model_id: str
    embedding: EmbeddingSpec

    def describe(self) -> str:
        return f"model {self.model_id} ({self.embedding.describe()})"

    def metadata(self) -> dict[bytes, bytes]:
        """The schema's metadata that says it."""
        value = {"model": self.model_id, "embedding": self.embedding.to_json()}
        return {METADATA_KEY: json.dumps(value).encode()}

    @classmethod
    def from_schema(cls, schema: pa.Schema, where: str) -> EmbeddingsOrigin:
        """Raises EmbeddingsError naming `where` when the metadata is missing or wrong."""
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise EmbeddingsError(f"{where} is not an embeddings file: its schema has no "
                                  f"{METADATA_KEY.decode()!r} metadata")  # fmt: skip
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise EmbeddingsError(f"{where}: its metadata is not JSON ({error})") from None
        if not isinstance(value, dict) or not isinstance(value.get("model"), str):
            raise EmbeddingsError(f"{where}: its metadata names no model")
        try:
            embedding = EmbeddingSpec.from_json(value.get("embedding"), where)
        except EmbeddingSpecError as error:
            raise EmbeddingsError(str(error)) from None
        return cls(value["model"], embedding)


def embedding_schema(prediction_schema: pa.Schema, origin: EmbeddingsOrigin) -> pa.Schema:
    """The run's embeddings schema: its prediction schema's columns less
    PREDICTION_ONLY_COLUMNS, in the same order, then the embedding."""
    vector = pa.list_(pa.from_numpy_dtype(STORED_DTYPE), origin.embedding.dimension)
    kept = [field for field in prediction_schema if field.name not in PREDICTION_ONLY_COLUMNS]
    fields = [*kept, pa.field(EMBEDDING_COLUMN, vector, nullable=False)]
    return pa.schema(fields, metadata=origin.metadata())


def embedding_row(prediction_row: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
    """A predicted row's embedding row: its columns less PREDICTION_ONLY_COLUMNS, and the
    vector, normalised and rounded to float16 (as pyarrow takes it for the column)."""
    columns = {k: v for k, v in prediction_row.items() if k not in PREDICTION_ONLY_COLUMNS}
    unit = unit_vectors(np.asarray(vector).reshape(1, -1))[0]
    return {**columns, EMBEDDING_COLUMN: unit.astype(STORED_DTYPE)}


def write_embeddings(path: str, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> None:
    """One embeddings file of `rows` (from `embedding_row`), for writers without Beam; name it
    to match EMBEDDING_FILES."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    with fsspec.open(path, "wb") as file:
        pq.write_table(table, file)


@dataclass(frozen=True)
class RunEmbeddings:
    """A run folder's embeddings files, their footers checked: every file is a Parquet file
    of embeddings of one origin, with vectors of its dimension."""

    folder: str
    origin: EmbeddingsOrigin
    files: tuple[str, ...]
    n_rows: int

    def batches(self, columns: Sequence[str]) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """(vectors as stored, the rows' `columns` that the files have) per batch of at most
        READ_BATCH_ROWS rows, in file order."""
        for file in self.files:
            with fsspec.open(file, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                present = [name for name in columns if name in parquet.schema_arrow.names]
                try:
                    for batch in parquet.iter_batches(
                        READ_BATCH_ROWS, columns=[*present, EMBEDDING_COLUMN]
                    ):
                        yield _vectors(batch, file), batch.drop_columns([EMBEDDING_COLUMN])
                except (OSError, pa.ArrowException) as error:
                    raise EmbeddingsError(f"{file} cannot be read ({error})") from None


def open_run_embeddings(folder: str) -> RunEmbeddings:
    """The embeddings of the run whose --output was `folder`; EmbeddingsError when it has
    none, or a file is not an embeddings file, or two files disagree on their origin."""
    return run_embeddings(folder, _embedding_files(folder))


def run_embeddings(folder: str, files: Sequence[str]) -> RunEmbeddings:
    """The embeddings in `files`, the embeddings files of the run whose --output was
    `folder` (for a reader that has listed them itself), checked as `open_run_embeddings`
    checks them."""
    if not files:
        raise EmbeddingsError(f"{folder} has no {EMBEDDING_FILES}")
    origin: EmbeddingsOrigin | None = None
    n_rows = 0
    for file in files:
        schema, rows = _footer(file)
        file_origin = EmbeddingsOrigin.from_schema(schema, file)
        _check_columns(schema, file_origin.embedding, file)
        if origin is not None and file_origin != origin:
            raise EmbeddingsError(
                f"{file} holds embeddings of {file_origin.describe()}, and {files[0]} of "
                f"{origin.describe()}: a run's files are of one model"
            )
        origin, n_rows = file_origin, n_rows + rows
    assert origin is not None  # there is at least one file
    if not n_rows:
        raise EmbeddingsError(f"{folder}'s embeddings hold no rows: none of its rows was predicted")
    return RunEmbeddings(folder, origin, tuple(files), n_rows)


def _embedding_files(folder: str) -> tuple[str, ...]:
    try:
        fs, path = fsspec.core.url_to_fs(folder)
        if not fs.isdir(path):
            why = "it is a file" if fs.isfile(path) else "no such folder"
            raise EmbeddingsError(f"{folder} is not a run's output folder: {why}")
        matches = sorted(fs.glob(posixpath.join(path.rstrip("/"), EMBEDDING_FILES)))
    except (ImportError, ValueError, OSError) as error:
        if isinstance(error, EmbeddingsError):
            raise
        raise EmbeddingsError(f"{folder} cannot be read ({error})") from None
    if not matches:
        raise EmbeddingsError(
            f"{folder} has no {EMBEDDING_FILES}: run python -m pipeline with --embeddings "
            "to write them"
        )
    return tuple(fs.unstrip_protocol(match) if "://" in folder else match for match in matches)


def _footer(file: str) -> tuple[pa.Schema, int]:
    try:
        with fsspec.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.schema_arrow, parquet.metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        raise EmbeddingsError(f"{file} is not a readable Parquet file ({error})") from None


def _check_columns(schema: pa.Schema, embedding: EmbeddingSpec, file: str) -> None:
    if "uri" not in schema.names:
        raise EmbeddingsError(f"{file} has no 'uri' column")
    if EMBEDDING_COLUMN not in schema.names:
        raise EmbeddingsError(f"{file} has no {EMBEDDING_COLUMN!r} column")
    kind = schema.field(EMBEDDING_COLUMN).type
    floats = (pa.float16(), pa.float32())
    if not pa.types.is_fixed_size_list(kind) or kind.value_type not in floats:
        raise EmbeddingsError(
            f"{file}: {EMBEDDING_COLUMN!r} must be a fixed-size list of float16 or float32, "
            f"not {kind}"
        )
    if kind.list_size != embedding.dimension:
        raise EmbeddingsError(
            f"{file}: its vectors have {kind.list_size} dimensions, and its metadata says "
            f"{embedding.dimension}"
        )


def _vectors(batch: pa.RecordBatch, file: str) -> np.ndarray:
    column = batch.column(EMBEDDING_COLUMN)
    if column.null_count:
        raise EmbeddingsError(f"{file}: {column.null_count} rows have no {EMBEDDING_COLUMN}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(batch), column.type.list_size)
