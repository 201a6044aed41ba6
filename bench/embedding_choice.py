"""`python -m bench.embedding_choice`: the measurements that chose the embedding's two
parts (docs/similar.md, "How the embedding was chosen"), on real paintings, by exact search.

It reads what `python -m bench.similar_quality --work WORK` made: the altered copies of the
`val` paintings (WORK/copies) and the `--embeddings` runs over the catalog and the copies
(WORK/run, WORK/copies-run); and the feature files the model was trained on
(--features_dir, every painting's). The copies' pooled features are computed once here
(float32 Keras, cached in WORK). Then:

- the fingerprint's pooling, on a sample (the paintings of --data read again, float32
  Keras, cached in WORK): each backbone's last map averaged whole (the pooled features
  the feature files hold) against averaged without its outer ring (`centre_pooled`, what
  the shipped fingerprint reads), each whitened to FINGERPRINT_DIMENSION numbers on
  POOLING_SAMPLE `train` paintings (and on half of them), the copies queried against an
  index of those and the `val` paintings;
- the fingerprint's dimension and whitening, on every painting's whole-map averages (the
  feature files hold no centre's): square-rooted, each backbone's at unit length, and
  projected on their principal directions over the `train` paintings, each scaled by its
  variance to the power -p (p = 0.5 whitens): by dimension and by p, each copy's nearest
  painting, and the distance that lists 98% of copy pairs against the share of distinct
  `val` pairs it lists;
- the style part: the `val` paintings' K nearest `train` paintings of their own style, by
  the head's projection, its hidden units, its probabilities, and the projection with the
  probabilities' square roots at several shares;
- what comes first: on the runs' own embeddings, each copy's most similar painting and the
  style neighbours, by which same pictures are put before the style's order.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bench.flags import DATA, JSON_OUTPUT
from bench.measure import write_results
from bench.similar_quality import (
    RECALL_TARGET,
    Embeddings,
    K,
    backbone_features,
    cached_rows,
)
from models.embedding import FINGERPRINT, STYLE, unit_vectors
from pipeline.cli import called_as
from pipeline.flags import MODEL, add

if TYPE_CHECKING:
    from models.bundle import ModelBundle

POOLING_SAMPLE = 4000  # `train` paintings the pooling's fingerprints are fitted on and index
FINGERPRINT_DIMENSIONS = (200, 240, 320, 400)
WHITENING_POWERS = (0.5, 0.45, 0.4, 0.35)
PROJECTION_SHARES = (0.6, 0.7, 0.8, 0.9)  # of the style part's squared length
SAME_PICTURE_DISTANCES = (0.5, 0.6)
RATIO = 0.8  # the ratio test: the nearest fingerprint under this share of the second's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.embedding_choice"), description=__doc__.split("\n")[0]
    )
    add(
        parser,
        JSON_OUTPUT,
        MODEL.but("The bundle that made WORK's runs."),
        DATA.but(help="The folder of the catalog WORK's run read (its images).", required=True),
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="bench.similar_quality's --work folder."
    )
    parser.add_argument(
        "--features_dir", required=True, help="The feature files the model was trained on."
    )
    return parser.parse_args(argv)


# --- Exact search -------------------------------------------------------------------------


def nearest(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest of `vectors` (unit rows): ids and cosine distances."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    similarities, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids, 1 - similarities


def own_style_share(vectors: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """The share of each `val` painting's K nearest `train` paintings of its own style."""
    val = ~train
    ids, _ = nearest(
        unit_vectors(vectors[train]), unit_vectors(vectors[val]), int(min(K, train.sum()))
    )
    return float(np.mean(labels[train][ids] == labels[val][:, None]))


# --- The fingerprint ---------------------------------------------------------------------


def fingerprint_scores(
    paintings: np.ndarray, copies: np.ndarray, original: np.ndarray, val: np.ndarray
) -> dict[str, float]:
    """Copies' nearest painting, and the distance for RECALL_TARGET of copy pairs against
    the distinct `val` pairs it lists."""
    ids, _ = nearest(paintings, copies, 1)
    to_original = 1 - np.sum(copies * paintings[original], axis=1)
    needed = float(np.sort(to_original)[int(np.ceil(RECALL_TARGET * len(copies))) - 1])
    of_val = paintings[val]
    distinct = 1 - (of_val @ of_val.T)[np.triu_indices(len(of_val), k=1)]
    return {"nearest_is_original": float(np.mean(ids[:, 0] == original)),
            "distance_for_98_percent_of_copies": needed,
            "distinct_pairs_listed_there": float(np.mean(distinct <= needed))}  # fmt: skip


def measure_fingerprints(
    pooled: np.ndarray, columns: list[tuple[int, int]], copies_pooled: np.ndarray,
    rows: pd.DataFrame, original: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """The fingerprint's ways, each from the source models.fingerprint whitens (`columns`:
    each backbone's pooled features in `pooled`)."""
    from models.fingerprint import source_of

    source = np.asarray(source_of(pooled, columns))
    copy_source = np.asarray(source_of(copies_pooled, columns))
    train, val = (rows["split"] == "train").to_numpy(), (rows["split"] == "val").to_numpy()
    mean = source[train].mean(axis=0)
    centred = (source[train] - mean).astype(np.float64)
    variances, directions = np.linalg.eigh(centred.T @ centred / len(centred))
    order = np.argsort(variances)[::-1]
    variances, directions = variances[order], directions[:, order]

    def scored(dimension: int, power: float) -> dict[str, float]:
        matrix = directions[:, :dimension] / variances[:dimension] ** power
        paintings = unit_vectors((source - mean) @ matrix)
        return fingerprint_scores(
            paintings, unit_vectors((copy_source - mean) @ matrix), original, val
        )

    return {
        "by_dimension_whitened": {d: scored(d, 0.5) for d in FINGERPRINT_DIMENSIONS},
        "by_power_at_240": {p: scored(240, p) for p in WHITENING_POWERS},
    }


def measure_pooling(
    bundle: ModelBundle, data: Path, work: Path, rows: pd.DataFrame, copies: pd.DataFrame
) -> dict[str, Any]:
    """The fingerprint of the whole maps' averages against their centres', on the sample
    `pooling_sample` chooses (see the module's docstring)."""
    from models.backbones import feature_extractor, pooled_columns, source_columns
    from models.fingerprint import Fingerprint
    from models.settings import FINGERPRINT_DIMENSION

    spec = bundle.manifest.backbone
    shapes = feature_extractor(spec.name, "pooled", weights=None, fingerprint_source=True)
    columns = {"whole map": pooled_columns(shapes, spec.name, "pooled"),
               "centre": source_columns(shapes, spec.name, "pooled")}  # fmt: skip
    indexed = pooling_sample(rows)
    by_uri = {uri: i for i, uri in enumerate(indexed["uri"])}
    original = np.array([by_uri[uri] for uri in copies["original"]])
    uris = [str(data / uri) for uri in indexed["uri"]]
    uris += [str(work / "copies" / uri) for uri in copies["uri"]]
    whole_and_centre = cached_rows(
        work / "pooling-sources.npy",
        partial(
            backbone_features, bundle.path, uris, feature_kind="pooled", fingerprint_source=True
        ),
    ).astype(np.float32)
    width = columns["whole map"][-1][1]
    sources = {"whole map": whole_and_centre[:, :width], "centre": whole_and_centre[:, width:]}
    train = (indexed["split"] == "train").to_numpy()
    val = ~train
    alteration = copies["alteration"].to_numpy()

    def scored(pooling: str, fitted_on: int) -> dict[str, Any]:
        fit = np.flatnonzero(train)[:fitted_on]
        fingerprint = Fingerprint.fitted(
            sources[pooling][fit], columns[pooling], FINGERPRINT_DIMENSION
        )
        vectors = np.asarray(fingerprint.of(sources[pooling]))
        paintings, copy_vectors = vectors[: len(indexed)], vectors[len(indexed) :]
        ids, _ = nearest(paintings, copy_vectors, 1)
        found = ids[:, 0] == original
        return {**fingerprint_scores(paintings, copy_vectors, original, val),
                "by_alteration": {kind: float(found[alteration == kind].mean())
                                  for kind in sorted(set(alteration))}}  # fmt: skip

    return {
        "index": {"train": int(train.sum()), "val": int(val.sum()), "copies": len(copies)},
        "whole map": scored("whole map", POOLING_SAMPLE),
        "centre": scored("centre", POOLING_SAMPLE),
        f"centre, fitted on {POOLING_SAMPLE // 2}": scored("centre", POOLING_SAMPLE // 2),
    }


def pooling_sample(rows: pd.DataFrame) -> pd.DataFrame:
    """The `val` paintings and POOLING_SAMPLE `train` paintings (seeded), in that order."""
    train = rows[rows["split"] == "train"]
    chosen = train.sample(min(POOLING_SAMPLE, len(train)), random_state=0)
    return pd.concat([rows[rows["split"] == "val"], chosen], ignore_index=True)


# --- The style part ----------------------------------------------------------------------


def measure_styles(projected: np.ndarray, head: dict[str, list], temperature: float,
                   rows: pd.DataFrame) -> dict[str, float]:  # fmt: skip
    keep = rows["split"].isin(["train", "val"]).to_numpy()
    labels, train = rows["label"].to_numpy()[keep], (rows["split"] == "train").to_numpy()[keep]
    projected = projected[keep]
    hidden = np.maximum(projected @ head["hidden"][0] + head["hidden"][1], 0)
    logits = (hidden @ head["logits"][0] + head["logits"][1]) / temperature
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    shares = {"projection": own_style_share(projected, labels, train),
              "hidden units": own_style_share(hidden, labels, train),
              "probabilities": own_style_share(probabilities, labels, train)}  # fmt: skip
    for share in PROJECTION_SHARES:
        roots = unit_vectors(np.sqrt(probabilities))
        both = np.concatenate(
            [np.sqrt(share) * unit_vectors(projected), np.sqrt(1 - share) * roots], axis=1
        )
        shares[f"projection {share} and the probabilities' roots"] = own_style_share(
            both, labels, train
        )
    return shares


# --- What comes first --------------------------------------------------------------------


def ranked(style_ids: np.ndarray, candidates: list[np.ndarray], k: int) -> np.ndarray:
    """Each query's list: its `candidates` first, then its style neighbours not among them."""
    lists = []
    for neighbours, first in zip(style_ids, candidates, strict=True):
        rest = neighbours[~np.isin(neighbours, first)]
        lists.append(np.concatenate([first, rest])[:k])
    return np.array(lists)


def first_candidates(
    fingerprints: np.ndarray, queries: np.ndarray, distance: float, rule: str
) -> list[np.ndarray]:
    """The same pictures a rule puts first: every fingerprint within `distance` ("all"),
    the nearest if within it ("nearest"), or that one if also under RATIO x the second
    nearest's distance ("ratio")."""
    import faiss

    if rule == "all":
        index = faiss.IndexFlatIP(fingerprints.shape[1])
        index.add(np.ascontiguousarray(fingerprints, dtype=np.float32))
        limits, similarities, ids = index.range_search(np.ascontiguousarray(queries), 1 - distance)
        found = []
        for start, end in itertools.pairwise(limits):
            order = np.argsort(-similarities[start:end])
            found.append(ids[start:end][order])
        return found
    ids, distances = nearest(fingerprints, queries, 2)
    keep = distances[:, 0] <= distance
    if rule == "ratio":
        keep &= distances[:, 0] <= RATIO * distances[:, 1]
    return [row[:1] if kept else row[:0] for row, kept in zip(ids, keep, strict=True)]


def measure_rules(work: Path) -> dict[str, Any]:
    paintings, copies = Embeddings(work / "run"), Embeddings(work / "copies-run")
    spec, rows = paintings.origin.embedding, paintings.rows
    styles, fingerprints = (
        spec.part(paintings.vectors, STYLE),
        spec.part(paintings.vectors, FINGERPRINT),
    )
    position = {uri: i for i, uri in enumerate(rows["uri"])}
    original = np.array([position[uri] for uri in copies.rows["original"]])
    train, val = (rows["split"] == "train").to_numpy(), (rows["split"] == "val").to_numpy()
    labels = rows["label"].to_numpy()
    copy_styles, _ = nearest(styles, spec.part(copies.vectors, STYLE), K)
    val_styles, _ = nearest(styles[train], styles[val], K)
    results: dict[str, Any] = {}
    for distance in SAME_PICTURE_DISTANCES:
        for rule in ("all", "nearest", "ratio"):
            firsts = first_candidates(
                fingerprints, spec.part(copies.vectors, FINGERPRINT), distance, rule
            )
            of_copies = ranked(copy_styles, firsts, 1)
            of_val = first_candidates(fingerprints[train], fingerprints[val], distance, rule)
            lists = ranked(val_styles, of_val, K)
            results[f"{rule} within {distance}"] = {
                "nearest_is_original": float(np.mean(of_copies[:, 0] == original)),
                "own_style_share": float(np.mean(labels[train][lists] == labels[val][:, None])),
                "same_pictures_first_a_val_query": float(np.mean([len(f) for f in of_val])),
            }
    return results


# --- The command -------------------------------------------------------------------------


def paintings_features(
    bundle: ModelBundle, features_dir: str
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Every painting's row (`uri`, `label`, `split`), pooled features (each backbone's, side
    by side, float16 as stored, as the copies' are), the head's projection of its features,
    and where each backbone's pooled features lie in those side by side."""
    import pyarrow.parquet as pq

    from models.backbones import feature_extractor, pooled_columns
    from models.embedding import PROJECTION_LAYER
    from pipeline.features import feature_files, read_matrix

    spec = bundle.manifest.backbone
    extractor = feature_extractor(spec.name, spec.feature_kind, weights=None)  # its shapes
    columns = pooled_columns(extractor, spec.name, spec.feature_kind)
    fs, files = feature_files(features_dir)
    rows = pq.read_table(files, filesystem=fs, columns=["uri", "label", "split"]).to_pandas()
    features = read_matrix(features_dir, "features", np.arange(len(rows)))
    pooled = np.concatenate([features[:, start:stop] for start, stop in columns], axis=1)
    kernel, bias = bundle.load_head().get_layer(PROJECTION_LAYER).get_weights()
    projected = np.concatenate(
        [features[start : start + 4096].astype(np.float32) @ kernel + bias
         for start in range(0, len(features), 4096)]
    )  # fmt: skip
    edges = np.cumsum([0, *(stop - start for start, stop in columns)]).tolist()
    return rows, pooled, projected, list(itertools.pairwise(edges))


def copies_pooled(bundle: ModelBundle, work: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The copies' catalog and their pooled features, computed once and kept in `work`."""
    catalog = pd.read_csv(work / "copies" / "catalog.csv", dtype=str)
    uris = [str(work / "copies" / uri) for uri in catalog["uri"]]
    pooled = cached_rows(
        work / "copies-pooled.npy",
        partial(backbone_features, bundle.path, uris, feature_kind="pooled"),
    )
    return catalog, pooled


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from models.bundle import ModelBundle

    bundle = ModelBundle.load(args.model)
    rows, pooled, projected, columns = paintings_features(bundle, args.features_dir)
    catalog, copies = copies_pooled(bundle, args.work)
    by_uri = {uri: i for i, uri in enumerate(rows["uri"])}
    original = np.array([by_uri[uri] for uri in catalog["original"]])
    head = {layer.name: layer.get_weights() for layer in bundle.load_head().layers
            if layer.get_weights()}  # fmt: skip
    results = {
        "model": bundle.id,
        "pooling": measure_pooling(bundle, args.data, args.work, rows, catalog),
        "fingerprint": measure_fingerprints(pooled, columns, copies, rows, original),
        "style_part": measure_styles(projected, head, bundle.manifest.head.temperature, rows),
        "what_comes_first": measure_rules(args.work),
    }
    write_results(results, Path(args.output))
    return results


if __name__ == "__main__":
    main()
