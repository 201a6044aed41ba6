"""`python -m bench.similar_quality`: how well a model's embeddings find duplicates and
paintings of a style, on real paintings, as a user's commands find them.

--data is a folder with catalog.csv (`uri`, `style`, `split` train/val). The whole catalog
is run once with `python -m pipeline --embeddings` (--run: an earlier such run is reused),
and so are five altered copies of every `val` painting (half size, JPEG quality 30, a 10%
crop, a 3-degree rotation, a frame of plain colour), made under --work. Then:

- near-duplicates: each copy queried against an index of all the catalog's paintings (the
  originals among them): the share whose nearest painting is its original, by alteration;
- the duplicates' threshold: the cosine distance of each copy's fingerprint to its
  original's, against those of every pair of distinct `val` paintings; the threshold that
  lists at least RECALL_TARGET of the copy pairs, and the share of distinct pairs it lists
  (at most FALSE_PAIR_TARGET wanted), checked with `near_pairs` on an index of originals
  and copies;
- style neighbours: each `val` painting queried against an index of the `train` paintings:
  the share of its K nearest whose label is its own, overall and by style;
- the index: `python -m pipeline.index` over the run (its own process: wall, CPU, peak
  memory), approximate (the default at this size) and exact; one query's p50 from Python
  on each; the approximate index's recall@K against exact, for the `val` paintings.

With --alternatives N, other vectors from the same model are scored the same way on a
sample (N `val` paintings a style and their copies, 2N `train` paintings a style): the
backbone's features, of which the embedding is a projection, are computed once for the
sample, and each alternative is a function of them (the head's other layers, the pooled
features, a PCA of the features).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageOps

from bench.flags import DATA, JSON_OUTPUT, REPO_ROOT
from bench.measure import run_process, write_results
from bench.similar import query_latencies_ms
from models.embedding import FINGERPRINT, EmbeddingSpec, unit_vectors
from models.vector_index import VectorIndex, chosen_parameters
from pipeline.cli import called_as
from pipeline.flags import MODEL, add
from transforms.embeddings import open_run_embeddings

ALTERATIONS = ("half_size", "jpeg_30", "crop_10", "rotate_3", "frame")
FRAME_COLOURS = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (92, 64, 40), (170, 30, 30))
FRAME_SHARE = 0.06  # of the shorter side, on each edge
CROP_KEPT = 0.9  # of each side, at one of the four corners
RECALL_TARGET = 0.98  # of copy pairs listed as duplicates
FALSE_PAIR_TARGET = 0.001  # of pairs of distinct `val` paintings, at most
NEAREST_TARGET = 0.99  # copies whose nearest painting is their original
STYLE_TARGET = 0.70  # of a `val` painting's K nearest `train` paintings of its style
K = 10
COLUMNS = ("uri", "label", "split", "original", "alteration")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.similar_quality"),
        description=__doc__.split("\n")[0],
        epilog="Other flags (--precision, --engine, ...) are the pipeline's, for its runs.",
    )
    add(
        parser,
        JSON_OUTPUT,
        DATA.but(help="A folder with catalog.csv (uri, style, split: train, val).", required=True),
        MODEL.but("It must give embeddings (a bundle trained with --projection)."),
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="Where the copies, runs and indexes go."
    )
    parser.add_argument(
        "--run", type=Path, default=None, help="A finished --embeddings run over --data."
    )
    parser.add_argument(
        "--alternatives",
        type=int,
        default=0,
        help="Score other vectors on N val paintings a style and their copies (0: none).",
    )
    args, pipeline_flags = parser.parse_known_args(argv)
    args.pipeline_flags = pipeline_flags
    return args


# --- The copies ------------------------------------------------------------------------


def altered(image: Image.Image, alteration: str, seed: int) -> tuple[Image.Image, dict]:
    """One altered copy of `image` (RGB) and how to save it (Pillow's keywords)."""
    rng = np.random.default_rng(seed)
    width, height = image.size
    if alteration == "half_size":
        half = (max(1, width // 2), max(1, height // 2))
        return image.resize(half, Image.Resampling.LANCZOS), {"format": "PNG"}
    if alteration == "jpeg_30":
        return image, {"format": "JPEG", "quality": 30}
    if alteration == "crop_10":
        kept = (round(width * CROP_KEPT), round(height * CROP_KEPT))
        left = (width - kept[0]) * int(rng.integers(2))
        top = (height - kept[1]) * int(rng.integers(2))
        return image.crop((left, top, left + kept[0], top + kept[1])), {"format": "PNG"}
    if alteration == "rotate_3":
        angle = 3.0 if rng.integers(2) else -3.0
        rotated = image.rotate(
            angle, Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255)
        )
        return rotated, {"format": "PNG"}
    if alteration == "frame":
        border = max(1, round(FRAME_SHARE * min(width, height)))
        colour = FRAME_COLOURS[int(rng.integers(len(FRAME_COLOURS)))]
        return ImageOps.expand(image, border=border, fill=colour), {"format": "PNG"}
    raise ValueError(f"unknown alteration {alteration!r}")


def make_copies(originals: pd.DataFrame, data: Path, folder: Path) -> Path:
    """Every alteration of each original (`uri` relative to `data`), as image files under
    `folder`, and `folder`/catalog.csv of them (`uri`, `original`, `alteration`, `style`,
    `split` "copy"); made once, kept for later runs."""
    catalog = folder / "catalog.csv"
    if catalog.is_file():
        return catalog
    rows = []
    for number, row in enumerate(originals.itertuples()):
        with Image.open(data / row.uri) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        for alteration in ALTERATIONS:
            copy, saving = altered(image, alteration, seed=number)
            suffix = ".jpg" if saving["format"] == "JPEG" else ".png"
            uri = f"{alteration}/{number:05d}{suffix}"
            (folder / alteration).mkdir(parents=True, exist_ok=True)
            copy.save(folder / uri, **saving)
            rows.append({"uri": uri, "original": row.uri, "alteration": alteration,
                         "style": row.style, "split": "copy"})  # fmt: skip
    pd.DataFrame(rows).to_csv(catalog, index=False)
    return catalog


def ensure_run(catalog: Path, output: Path, model: str, flags: list[str]) -> dict[str, Any]:
    """`python -m pipeline --embeddings` over `catalog` into `output`, unless a run is there,
    and what it cost: measured now, or read back from beside a run reused (where it was
    written when the run was made)."""
    measured = output.with_suffix(".json")
    if (output / "summary.json").is_file():
        cost = json.loads(measured.read_text()) if measured.is_file() else {}
        return {**cost, "reused": True}
    command = [sys.executable, "-m", "pipeline", f"--input={catalog}", f"--output={output}",
               f"--model={model}", "--embeddings", *flags]  # fmt: skip
    process = run_process(command, output.with_suffix(".log"))
    cost = {"wall_s": process.wall_s, "cpu_s": process.cpu_s, "peak_rss_mb": process.peak_rss_mb}
    measured.write_text(json.dumps(cost) + "\n")
    return cost


# --- Reading a run's embeddings ----------------------------------------------------------


class Embeddings:
    """A run's vectors (float32, unit length) and the columns COLUMNS that it has."""

    def __init__(self, folder: Path):
        run = open_run_embeddings(str(folder))
        self.origin = run.origin
        vectors, tables = [], []
        for batch_vectors, rows in run.batches(COLUMNS):
            vectors.append(batch_vectors.astype(np.float32))
            tables.append(pa.Table.from_batches([rows]))
        self.vectors = unit_vectors(np.concatenate(vectors))
        self.rows = pa.concat_tables(tables).to_pandas()

    def where(self, mask: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
        return self.vectors[mask], self.rows[mask].reset_index(drop=True)


def index_of(
    vectors: np.ndarray, rows: pd.DataFrame, spec: EmbeddingSpec, search: str = "auto"
) -> VectorIndex:
    """An index of these vectors, as the index command builds one (its kind by `search`)."""
    index = VectorIndex.new("bench", spec, chosen_parameters(search, len(vectors)))
    index.add(vectors, pa.Table.from_pandas(rows[[c for c in ("uri", "label") if c in rows]]))
    return index


def whole_vectors(vectors: np.ndarray) -> EmbeddingSpec:
    """The description of vectors without parts (the alternatives): each is compared whole."""
    return EmbeddingSpec(vectors.shape[1], "bench")


# --- The measures ------------------------------------------------------------------------


def nearest_originals(
    index: VectorIndex, copies: np.ndarray, originals: list[str], alterations: list[str]
) -> dict[str, Any]:
    """The share of copies whose nearest painting in `index` is their original, overall and
    by alteration; and the share whose original is among their 5 nearest."""
    found = index.search(copies, 5)
    uris = index.items.column("uri").to_pylist()
    first = np.array([bool(len(f.ids)) and uris[f.ids[0]] == o for f, o in zip(found, originals,
                      strict=True)])  # fmt: skip
    top5 = np.array([o in {uris[i] for i in f.ids} for f, o in zip(found, originals, strict=True)])
    by = pd.Series(first).groupby(np.asarray(alterations)).mean()
    misses = [
        {"original": o, "alteration": a, "nearest": uris[f.ids[0]],
         "nearest_distance": float(f.distances[0])}
        for f, o, a, hit in zip(found, originals, alterations, first, strict=True) if not hit
    ][:20]  # fmt: skip
    return {
        "copies": len(originals),
        "nearest_is_original": float(first.mean()),
        "original_in_5_nearest": float(top5.mean()),
        "by_alteration": {str(k): float(v) for k, v in by.items()},
        "target": NEAREST_TARGET,
        "first_misses": misses,
    }


def copy_distances(
    copies: np.ndarray, originals: list[str], vectors: np.ndarray, uris: list[str]
) -> np.ndarray:
    """Each copy's cosine distance to its original."""
    position = {uri: i for i, uri in enumerate(uris)}
    of_original = vectors[[position[uri] for uri in originals]]
    return np.clip(1 - np.sum(copies * of_original, axis=1), 0, 2)


def distinct_pair_distances(vectors: np.ndarray) -> np.ndarray:
    """The cosine distance of every pair of distinct paintings (each pair once)."""
    upper = np.triu_indices(len(vectors), k=1)
    return np.clip(1 - (vectors @ vectors.T)[upper], 0, 2)


def threshold_choice(
    copies: np.ndarray, distinct: np.ndarray, alterations: list[str]
) -> dict[str, Any]:
    """The smallest threshold that lists RECALL_TARGET of the copy pairs, and the share of
    distinct pairs it lists; the largest that lists under FALSE_PAIR_TARGET of those, and
    the share of copy pairs it lists; the chosen threshold, a round number between the two
    where there is room, else the first (the copies' target kept)."""
    ordered_copies, ordered_distinct = np.sort(copies), np.sort(distinct)
    needed = float(ordered_copies[int(np.ceil(RECALL_TARGET * len(copies))) - 1])
    first_too_many = ordered_distinct[int(np.ceil(FALSE_PAIR_TARGET * len(distinct))) - 1]
    allowed = float(np.nextafter(np.float32(first_too_many), np.float32(0)))
    chosen = _round_between(needed, allowed) if needed <= allowed else needed
    by_alteration = pd.Series(copies <= chosen).groupby(np.asarray(alterations)).mean()
    return {
        "recall_target": RECALL_TARGET,
        "false_pair_target": FALSE_PAIR_TARGET,
        "needed_for_recall": needed,
        "false_pairs_at_needed": float(np.mean(distinct <= needed)),
        "allowed_by_false_pairs": allowed,
        "recall_at_allowed": float(np.mean(copies <= allowed)),
        "chosen": chosen,
        "recall_at_chosen": float(np.mean(copies <= chosen)),
        "false_pairs_at_chosen": float(np.mean(distinct <= chosen)),
        "both_met": bool(
            np.mean(copies <= chosen) >= RECALL_TARGET
            and np.mean(distinct <= chosen) < FALSE_PAIR_TARGET
        ),
        "recall_at_chosen_by_alteration": {str(k): float(v) for k, v in by_alteration.items()},
        "copy_distance_quantiles": _quantiles(copies),
        "distinct_distance_quantiles": _quantiles(distinct, (0.0001, 0.001, 0.01, 0.5)),
    }


def _round_between(low: float, high: float) -> float:
    """The number of fewest significant digits in [low, high], nearest their middle."""
    for digits in range(1, 6):
        step = 10.0 ** (np.floor(np.log10(high)) - digits + 1)
        candidates = np.arange(np.ceil(low / step), np.floor(high / step) + 1) * step
        if len(candidates):
            return float(round(candidates[np.argmin(abs(candidates - (low + high) / 2))], 6))
    return high


def _quantiles(values: np.ndarray, at: tuple[float, ...] = (0.5, 0.9, 0.98, 0.99, 1.0)) -> dict:
    return {str(q): float(np.quantile(values, q)) for q in at}


def listed_by_near_pairs(
    originals: np.ndarray,
    copies: np.ndarray,
    copy_of: np.ndarray,
    threshold: float,
    spec: EmbeddingSpec,
) -> dict[str, Any]:
    """The duplicates command's own pairs at `threshold`, on an index of the originals then
    the copies (copy i of original copy_of[i]): copy pairs found, distinct pairs listed."""
    n = len(originals)
    index = VectorIndex.new("bench", spec)
    ids = [f"o{i}" for i in range(n)] + [f"c{i}" for i in range(len(copies))]
    index.add(np.concatenate([originals, copies]), pa.table({"uri": ids}))
    started = time.perf_counter()
    pairs = index.near_pairs(threshold)
    seconds = time.perf_counter() - started
    a, b = pairs.column("id_a").to_numpy(), pairs.column("id_b").to_numpy()
    copy_pairs = {(int(copy_of[j - n]), int(j)) for j in range(n, n + len(copies))}
    found = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    distinct = int(np.sum((a < n) & (b < n)))
    return {
        "threshold": threshold,
        "seconds": seconds,
        "copy_pairs_listed": len(copy_pairs & found) / len(copy_pairs),
        "distinct_val_pairs_listed": distinct,
        "distinct_val_pairs_share": distinct / (n * (n - 1) / 2),
    }


def closest_pairs(vectors: np.ndarray, rows: pd.DataFrame, n: int = 12) -> list[dict[str, Any]]:
    """The `n` nearest pairs of distinct paintings: a collection's own duplicates, or not."""
    distances = distinct_pair_distances(vectors)
    upper = np.triu_indices(len(vectors), k=1)
    nearest = np.argsort(distances)[:n]
    uris = rows["uri"].tolist()
    return [{"uri_a": uris[upper[0][i]], "uri_b": uris[upper[1][i]],
             "distance": float(distances[i])} for i in nearest]  # fmt: skip


def style_neighbours(
    train: VectorIndex, queries: np.ndarray, labels: list[str], k: int = K
) -> dict[str, Any]:
    """The share of each query's k nearest `train` paintings whose label is its own."""
    found = train.search(queries, k)
    neighbour_labels = train.items.column("label").to_pylist()
    shares = np.array([
        np.mean([neighbour_labels[i] == label for i in f.ids])
        for f, label in zip(found, labels, strict=True)
    ])  # fmt: skip
    by = pd.Series(shares).groupby(np.asarray(labels)).mean().sort_values()
    return {
        "k": k,
        "share_of_own_style": float(shares.mean()),
        "by_style": {str(style): float(share) for style, share in by.items()},
        "target": STYLE_TARGET,
    }


def first_against_exact(
    approximate: VectorIndex, exact: VectorIndex, copies: np.ndarray
) -> dict[str, float]:
    """The share of copies whose most similar painting on the approximate index is the
    exact index's, by the cells a query by fingerprint visits (FINGERPRINT_CELLS_FACTOR x
    `nprobe`): the cells are fitted on whole vectors, not on fingerprints."""
    from models.vector_index import FINGERPRINT_CELLS_FACTOR, IvfParameters

    truth = [one.ids[0] for one in exact.search(copies, 1)]
    fitted = approximate.manifest
    assert fitted.approximate is not None
    shares = {}
    for nprobe in (4, 8, 16, 32):
        approximate.manifest = replace(
            fitted, approximate=IvfParameters(fitted.approximate.nlist, nprobe)
        )
        found = [one.ids[0] for one in approximate.search(copies, 1)]
        cells = nprobe * FINGERPRINT_CELLS_FACTOR
        shares[f"{cells}_cells"] = float(np.mean(np.equal(found, truth)))
    approximate.manifest = fitted
    return shares


def recall_against_exact(
    approximate: VectorIndex, exact: VectorIndex, queries: np.ndarray
) -> float:
    truth = exact.search(queries, K)
    found = approximate.search(queries, K)
    return float(np.mean([len(set(f.ids) & set(t.ids)) / K
                          for f, t in zip(found, truth, strict=True)]))  # fmt: skip


def build_with_the_command(run: Path, output: Path, search: str) -> dict[str, Any]:
    """`python -m pipeline.index RUN --output OUTPUT --search SEARCH`, as its own process."""
    if output.exists():
        import shutil

        shutil.rmtree(output)
    command = [sys.executable, "-m", "pipeline.index", str(run), f"--output={output}",
               f"--search={search}"]  # fmt: skip
    process = run_process(command, output.with_suffix(".log"))
    return {"wall_s": process.wall_s, "cpu_s": process.cpu_s, "peak_rss_mb": process.peak_rss_mb}


# --- One vector's scores -----------------------------------------------------------------


def scores(
    vectors: np.ndarray, rows: pd.DataFrame, spec: EmbeddingSpec, with_timings: bool = False
) -> dict[str, Any]:
    """Every measure of one kind of vector (described by `spec`), on rows of the originals
    (`split` train/val) and the copies (`original`, `alteration`), all of one run or of one
    sample. Distances between copies and originals, and between distinct paintings, are the
    fingerprints' (what duplicates compare); searches are the index's own."""
    is_copy = rows["alteration"].notna().to_numpy()
    originals, original_rows = vectors[~is_copy], rows[~is_copy].reset_index(drop=True)
    copies, copy_rows = vectors[is_copy], rows[is_copy].reset_index(drop=True)
    val = (original_rows["split"] == "val").to_numpy()
    train = (original_rows["split"] == "train").to_numpy()
    results: dict[str, Any] = {"dimension": vectors.shape[1], "paintings": len(originals),
                               "val": int(val.sum()), "train": int(train.sum())}  # fmt: skip
    everything = index_of(originals, original_rows, spec)
    copy_originals = copy_rows["original"].tolist()
    results["near_duplicates"] = nearest_originals(
        everything, copies, copy_originals, copy_rows["alteration"].tolist()
    )
    uris = original_rows["uri"].tolist()
    fingerprints, copy_fingerprints = (
        spec.part(originals, FINGERPRINT),
        spec.part(copies, FINGERPRINT),
    )
    to_original = copy_distances(copy_fingerprints, copy_originals, fingerprints, uris)
    distinct = distinct_pair_distances(fingerprints[val])
    choice = threshold_choice(to_original, distinct, copy_rows["alteration"].tolist())
    results["threshold"] = choice
    val_position = {uri: i for i, uri in enumerate(original_rows["uri"][val])}
    copy_of = np.array([val_position[uri] for uri in copy_originals])
    results["near_pairs"] = listed_by_near_pairs(
        originals[val], copies, copy_of, choice["chosen"], spec
    )
    train_index = index_of(originals[train], original_rows[train].reset_index(drop=True), spec)
    results["style_neighbours"] = style_neighbours(
        train_index, originals[val], original_rows["label"][val].tolist()
    )
    if with_timings:
        results["closest_distinct_val_pairs"] = closest_pairs(fingerprints[val], original_rows[val])
        exact = index_of(originals, original_rows, spec, "exact")
        results["near_duplicates_exact_search"] = nearest_originals(
            exact, copies, copy_originals, copy_rows["alteration"].tolist()
        )
        results["index_kind"] = everything.manifest.kind
        if spec.fingerprint_dimension and everything.manifest.approximate is not None:
            results["copies_first_as_exact_by_fingerprint_cells"] = first_against_exact(
                everything, exact, copies
            )
        results["recall_at_10_against_exact"] = recall_against_exact(
            everything, exact, originals[val]
        )
        results["one_query"] = {
            everything.manifest.kind: query_latencies_ms(everything, originals[val][:300]),
            "exact": query_latencies_ms(exact, originals[val][:300]),
        }
    return results


# --- Other vectors from the same features ------------------------------------------------


def sample(rows: pd.DataFrame, per_style: int, split: str, seed: int = 0) -> pd.DataFrame:
    """`per_style` rows of each label of `split`, seeded."""
    chosen = rows[rows["split"] == split]
    return chosen.groupby("label", group_keys=False).apply(
        lambda group: group.sample(min(per_style, len(group)), random_state=seed)
    )


def backbone_features(
    bundle_path: str,
    uris: list[str],
    batch_size: int = 32,
    feature_kind: str | None = None,
    fingerprint_source: bool = False,
) -> np.ndarray:
    """The bundle's backbone features (what its head reads, or those of another
    `feature_kind`) of these images, float32 Keras, decoded as the pipeline decodes them;
    with `fingerprint_source`, each row followed by the image's fingerprint source."""
    from models.backbones import feature_extractor
    from models.bundle import ModelBundle
    from transforms.fetch import read_file
    from transforms.images import decode_image

    bundle = ModelBundle.load(bundle_path)
    spec = bundle.manifest.backbone
    extractor = feature_extractor(
        spec.name,
        feature_kind or spec.feature_kind,
        weights=spec.weights,
        fingerprint_source=fingerprint_source,
    )

    def decoded(uri: str) -> np.ndarray:
        return decode_image(read_file(uri), size=bundle.input_size)

    out = []
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(uris), batch_size):
            images = np.stack(list(pool.map(decoded, uris[start : start + batch_size])))
            outputs = extractor.predict_on_batch(images)
            side_by_side = np.concatenate(outputs, axis=1) if fingerprint_source else outputs
            out.append(np.asarray(side_by_side, np.float16))
            _progress(f"features {start + len(images):,}/{len(uris):,}")
    return np.concatenate(out)


def cached_rows(cache: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`, saved in `cache` the first time and read back after (a pass of the
    backbones over thousands of images, made once for every run of a benchmark)."""
    if not cache.is_file():
        np.save(cache, compute())
    return np.load(cache)


def alternative_vectors(
    bundle_path: str, features: np.ndarray, fit_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Vectors computed from the backbone's features by the bundle's head and by other
    functions; `fit_rows` (training paintings) fit those that are fitted (a PCA)."""
    from models.bundle import ModelBundle
    from models.embedding import PROJECTION_LAYER

    head = ModelBundle.load(bundle_path).load_head()
    weights = {layer.name: layer.get_weights() for layer in head.layers if layer.get_weights()}
    x = features.astype(np.float32)
    projection = x @ weights[PROJECTION_LAYER][0] + weights[PROJECTION_LAYER][1]
    hidden = np.maximum(projection @ weights["hidden"][0] + weights["hidden"][1], 0)
    logits = hidden @ weights["logits"][0] + weights["logits"][1]
    mean, scale = x[fit_rows].mean(0), x[fit_rows].std(0) + 1e-6
    standard = (x - mean) / scale
    _, _, directions = np.linalg.svd(standard[fit_rows], full_matrices=False)
    alternatives = {
        "projection (the embedding)": projection,
        "hidden layer (after ReLU)": hidden,
        "logits": logits,
        "features, standardised": standard,
        "features, standardised, PCA 256": standard @ directions[:256].T,
        "features, standardised, PCA 512": standard @ directions[:512].T,
    }
    pooled = _pooled_slices(bundle_path)
    for name, part in pooled:
        alternatives[f"pooled {name}"] = x[:, part]
    parts = [unit_vectors(projection)] + [unit_vectors(x[:, part]) for _, part in pooled]
    alternatives["projection + pooled"] = np.concatenate(parts, axis=1)
    return alternatives


def _pooled_slices(bundle_path: str) -> list[tuple[str, slice]]:
    """Where each backbone's pooled features are in the bundle's feature vector."""
    from models.backbones import backbones_of, feature_extractor, pooled_columns
    from models.bundle import ModelBundle

    spec = ModelBundle.load(bundle_path).manifest.backbone
    extractor = feature_extractor(spec.name, spec.feature_kind, weights=None)
    columns = pooled_columns(extractor, spec.name, spec.feature_kind)
    names = [backbone.name for backbone in backbones_of(spec.name)]
    return [(name, slice(start, stop)) for name, (start, stop) in zip(names, columns, strict=True)]


def measure_alternatives(
    args: argparse.Namespace, run_rows: pd.DataFrame, copy_rows: pd.DataFrame
) -> dict[str, Any]:
    per_style = args.alternatives
    val = sample(run_rows, per_style, "val")
    train = sample(run_rows, 2 * per_style, "train")
    copies = copy_rows[copy_rows["original"].isin(set(val["uri"]))]
    rows = pd.concat([val, train, copies], ignore_index=True)
    folders = [args.work / "copies" if pd.notna(a) else args.data for a in rows["alteration"]]
    uris = [str(folder / uri) for folder, uri in zip(folders, rows["uri"], strict=True)]
    features = cached_rows(
        args.work / f"alternative-features-{per_style}.npy",
        partial(backbone_features, args.model, uris),
    )
    fit = (rows["split"] == "train").to_numpy()
    results = {"val_per_style": per_style, "train_per_style": 2 * per_style,
               "copies": len(copies)}  # fmt: skip
    for name, vectors in alternative_vectors(args.model, features, np.flatnonzero(fit)).items():
        _progress(f"scoring {name}")
        results[name] = scores(unit_vectors(vectors), rows, whole_vectors(vectors))
    return results


# --- The command -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    catalog = pd.read_csv(args.data / "catalog.csv", dtype=str, keep_default_na=False)
    results: dict[str, Any] = {"machine": _machine(), "model": _model_named(args.model),
                               "load_average_1min_before": os.getloadavg()[0]}  # fmt: skip
    run = args.run or args.work / "run"
    _progress(f"the run over {args.data / 'catalog.csv'}")
    results["run"] = ensure_run(args.data / "catalog.csv", run, args.model, args.pipeline_flags)
    _progress("the copies, and their run")
    copies_catalog = make_copies(
        catalog[catalog["split"] == "val"], args.data, args.work / "copies"
    )
    results["copies_run"] = ensure_run(
        copies_catalog, args.work / "copies-run", args.model, args.pipeline_flags
    )
    paintings, copies = Embeddings(run), Embeddings(args.work / "copies-run")
    results["embedding"] = paintings.origin.embedding.to_json()
    rows = pd.concat([paintings.rows, copies.rows], ignore_index=True)
    vectors = np.concatenate([paintings.vectors, copies.vectors])
    _progress("the index command")
    results["index_command"] = {
        search: build_with_the_command(run, args.work / f"index-{search}", search)
        for search in ("auto", "exact")
    }
    _progress("the model's embedding")
    spec = paintings.origin.embedding
    results["embedding_scores"] = scores(vectors, rows, spec, with_timings=True)
    write_results(results, Path(args.output))
    if args.alternatives:
        _progress("other vectors from the same features")
        results["alternatives"] = measure_alternatives(args, paintings.rows, copies.rows)
    results["load_average_1min_after"] = os.getloadavg()[0]
    write_results(results, Path(args.output))
    print(json.dumps(results, indent=2))
    return results


def _model_named(path: str) -> str:
    """The bundle's id, and its folder as the repository names it where it is the repository's
    (results name no folder of the machine they were measured on)."""
    from models.bundle import ModelBundle

    folder = Path(path).resolve()
    shown = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder.name
    return f"{shown} ({ModelBundle.load(path).id})"


def _machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _progress(section: str) -> None:
    print(f"bench.similar_quality: {section} ...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
