"""`python -m bench.similar`: the nearest-neighbour index's cost, on synthetic embeddings.

Synthetic embeddings stand in for paintings' at scale: unit vectors of --dimension drawn
around a thousand random centres (paintings of a style, a school, a painter lie near one
another), a few of them altered copies of others (near-duplicates), stored as float16 as
the pipeline stores them. A network's embeddings vary along far fewer directions than they
have dimensions: the spread around a centre lies in --latent_dimension random directions
(0: in all of them, where every painting of a cluster is about as far from a query as any
other, the hardest case for an approximate index). Queries are drawn the same way and are
not in the index.

Measured, in one run:
- the exact search's one-query latency as the index grows: where it passes half the 5 ms
  target is where an index becomes approximate (models.vector_index.EXACT_LIMIT);
- `python -m pipeline.index` building an index of each of --sizes paintings from a run's
  embeddings files, as a user runs it (its own process: wall time, peak memory, bytes on
  disk per painting), exact and approximate;
- at the first size, one query from Python (p50, p95) on each, and the approximate index's
  recall@10 against exact search, at every size;
- the duplicates' pairs at the first size, and how many of the planted copies they find;
- at the first size, one query from Python on the same vectors read as two parts (style,
  fingerprint), as the shipped model's embedding is: two searches a query.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.flags import JSON_OUTPUT
from bench.measure import run_process, write_results
from models.embedding import FINGERPRINT, STORED_DTYPE, STYLE, EmbeddingSpec, unit_vectors
from models.vector_index import EXACT_LIMIT, VectorIndex, chosen_parameters
from pipeline.cli import called_as
from transforms.embeddings import EMBEDDING_FILE_PREFIX, EmbeddingsOrigin, embedding_schema

CENTRES = 1000
SPREAD = 1.0  # the noise's length around a centre: a painting's cosine to it is about 0.7
RESIDUE = 0.1  # with a latent dimension, the length of the noise outside it
COPY_SHARE = 0.01  # of the paintings, altered copies of another
COPY_NOISE = 0.05  # a copy's noise: about 0.001 in cosine distance from its original
SHARD_ROWS = 100_000
QUERY_TARGET_MS = 5.0
K = 10
NPROBES = (4, 8, 16, 32, 64)  # IVF's cells visited per query: recall against time
ORIGIN_MODEL = "bench-synthetic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.similar"), description=__doc__.split("\n")[0]
    )
    JSON_OUTPUT(parser)
    parser.add_argument("--dimension", type=int, default=512, help="The embedding's length.")
    parser.add_argument(
        "--latent_dimension",
        type=int,
        default=32,
        help="Directions the paintings vary in around their centre (0: all of them).",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="Paintings per index built; the first is also queried.",
    )
    parser.add_argument("--queries", type=int, default=300, help="Queries timed and scored.")
    parser.add_argument(
        "--exact_sizes",
        type=int,
        nargs="+",
        default=[5_000, 10_000, 20_000, 50_000, 100_000],
        help="Sizes at which the exact search's one query is timed.",
    )
    parser.add_argument(
        "--skip_exact_above",
        type=int,
        default=1_000_000,
        help="No exact index is built past this size (it is only vectors in a row).",
    )
    return parser.parse_args(argv)


class SyntheticEmbeddings:
    """Seeded clustered unit vectors (see the module's docstring), chunk by chunk."""

    def __init__(self, dimension: int, latent_dimension: int = 0, seed: int = 0):
        self.dimension = dimension
        rng = np.random.default_rng(seed)
        self.centres = unit_vectors(rng.standard_normal((CENTRES, dimension)))
        self._latent = (
            unit_vectors(rng.standard_normal((latent_dimension, dimension)))
            if latent_dimension
            else None
        )
        self._seed = seed

    def chunk(self, start: int, n: int, stream: int = 0) -> np.ndarray:
        """Paintings start..start+n of a stream (0: the index's, 1: the queries'), float32
        holding float16 values."""
        return self._draw(start, n, stream)[0]

    def _draw(self, start: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """A chunk, and its planted pairs (original, copy) by id: COPY_SHARE of the index's
        paintings are copies of another painting of the chunk, never of a copy."""
        rng = np.random.default_rng([self._seed, stream, start])
        around = self.centres[rng.integers(CENTRES, size=n)]
        vectors = unit_vectors(around + self._noise(rng, n))
        n_copies = int(n * COPY_SHARE) if stream == 0 else 0
        chosen = rng.choice(n, size=2 * n_copies, replace=False)
        copies, originals = chosen[:n_copies], chosen[n_copies:]
        jitter = rng.standard_normal((n_copies, self.dimension)) * COPY_NOISE
        vectors[copies] = unit_vectors(vectors[originals] + jitter / np.sqrt(self.dimension))
        pairs = np.sort(np.stack([originals, copies], axis=1), axis=1) + start
        return vectors.astype(STORED_DTYPE).astype(np.float32), pairs

    def _noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """SPREAD long on average: in the latent directions (and RESIDUE outside them), or
        in all."""
        if self._latent is None:
            return rng.standard_normal((n, self.dimension)) * SPREAD / np.sqrt(self.dimension)
        latent = len(self._latent)
        inside = rng.standard_normal((n, latent)) @ self._latent * SPREAD / np.sqrt(latent)
        outside = rng.standard_normal((n, self.dimension)) * RESIDUE / np.sqrt(self.dimension)
        return inside + outside

    def planted_pairs(self, size: int) -> set[tuple[int, int]]:
        """The (original, copy) pairs of the first `size` paintings, by index id, smaller
        id first."""
        return {
            (int(a), int(b))
            for start in range(0, size, SHARD_ROWS)
            for a, b in self._draw(start, min(SHARD_ROWS, size - start), 0)[1]
        }

    def vectors(self, size: int) -> np.ndarray:
        return np.concatenate(
            [self.chunk(s, min(SHARD_ROWS, size - s)) for s in range(0, size, SHARD_ROWS)]
        )


def write_run(data: SyntheticEmbeddings, size: int, folder: Path) -> Path:
    """A run's output folder of `size` paintings' embeddings, as the pipeline writes them."""
    origin = EmbeddingsOrigin(ORIGIN_MODEL, EmbeddingSpec(data.dimension, "synthetic"))
    keys = pa.schema([("uri", pa.string()), ("style", pa.string()), ("confidence", pa.float32())])
    schema = embedding_schema(keys, origin)
    folder.mkdir(parents=True)
    shards = (size + SHARD_ROWS - 1) // SHARD_ROWS
    for shard, start in enumerate(range(0, size, SHARD_ROWS)):
        vectors = data.chunk(start, min(SHARD_ROWS, size - start)).astype(STORED_DTYPE)
        n = len(vectors)
        columns = [
            pa.array([f"images/{start + i:07d}.jpg" for i in range(n)]),
            pa.array([f"style {(start + i) % 16}" for i in range(n)]),
            pa.array(np.full(n, 0.5, np.float32)),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), data.dimension),
        ]
        name = f"{EMBEDDING_FILE_PREFIX}-{shard:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), folder / name)
    return folder


def query_latencies_ms(index: VectorIndex, queries: np.ndarray) -> dict[str, float]:
    """One query at a time from Python, as the service and `pipeline.similar` ask."""
    index.search(queries[:5], K)  # warm-up: pages in, FAISS's threads started
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query, K)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def recall_at_k(approximate: VectorIndex, truth: np.ndarray, queries: np.ndarray) -> float:
    found = approximate.search(queries, K)
    return float(np.mean([len(set(one.ids) & set(row)) / K
                          for one, row in zip(found, truth, strict=True)]))  # fmt: skip


def exact_truth(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The true K nearest of each query, by brute force in blocks (the vectors may be many)."""
    best = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(vectors), SHARD_ROWS):
        scores = queries @ vectors[start : start + SHARD_ROWS].T
        ids = np.argsort(-scores, axis=1)[:, :K] + start
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, ids - start, 1)],
                                       axis=1)  # fmt: skip
        merged = np.concatenate([best, ids], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :K]
        best = np.take_along_axis(merged, order, 1)
        best_scores = np.take_along_axis(merged_scores, order, 1)
    return best


def measure_exact_curve(
    data: SyntheticEmbeddings, queries: np.ndarray, sizes: list[int]
) -> dict[str, Any]:
    """The exact index's one-query p50 at `sizes`: the size where it passes half the target
    is the largest an exact index should be."""
    vectors = data.vectors(max(sizes))
    curve = {}
    for size in sizes:
        index = VectorIndex.new(ORIGIN_MODEL, EmbeddingSpec(data.dimension, "synthetic"))
        index.add(vectors[:size], pa.table({"uri": [str(i) for i in range(size)]}))
        curve[str(size)] = query_latencies_ms(index, queries)
    quick = [size for size in sizes if curve[str(size)]["p50_ms"] <= QUERY_TARGET_MS / 2]
    return {
        "exact_one_query_by_size": curve,
        "exact_largest_size_under_half_target": max(quick) if quick else None,
        "exact_limit_in_code": EXACT_LIMIT,
    }


def build(run: Path, output: Path, search: str, log: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "pipeline.index", str(run), f"--output={output}",
               f"--search={search}"]  # fmt: skip
    process = run_process(command, log)
    index_bytes = sum(path.stat().st_size for path in output.iterdir())
    vector_bytes = sum(path.stat().st_size for path in output.glob("vectors-*"))
    size = VectorIndex.load(str(output)).size
    return {
        "wall_s": process.wall_s,
        "cpu_s": process.cpu_s,
        "peak_rss_mb": process.peak_rss_mb,
        "bytes_per_painting": index_bytes / size,
        "vector_bytes_per_painting": vector_bytes / size,
    }


def measure_size(
    data: SyntheticEmbeddings, size: int, queries: np.ndarray, args: argparse.Namespace,
    folder: Path, first: bool,
) -> dict[str, Any]:  # fmt: skip
    run = write_run(data, size, folder / f"run-{size}")
    results: dict[str, Any] = {"run_file_bytes_per_painting": _folder_bytes(run) / size}
    searches = ["approximate"] + (["exact"] if size <= args.skip_exact_above else [])
    for search in searches:
        _progress(f"building a {search} index of {size:,}")
        results[f"build_{search}"] = build(
            run, folder / f"index-{size}-{search}", search, folder / "build.log"
        )
    approximate = VectorIndex.load(str(folder / f"index-{size}-approximate"))
    _progress(f"recall@{K} at {size:,}")
    truth = exact_truth(data.vectors(size), queries)
    results["approximate_index"] = approximate.manifest.to_json()["index"]
    results[f"approximate_recall_at_{K}"] = recall_at_k(approximate, truth, queries)
    results["by_nprobe"] = by_nprobe(approximate, truth, queries, timed=first)
    if first:
        _progress(f"one query at a time at {size:,}")
        results["approximate_query"] = query_latencies_ms(approximate, queries)
        if "exact" in searches:
            exact = VectorIndex.load(str(folder / f"index-{size}-exact"))
            results["exact_query"] = query_latencies_ms(exact, queries)
            del exact
        _progress(f"duplicates at {size:,}")
        results["duplicates"] = measure_duplicates(approximate, data.planted_pairs(size))
        del approximate
        _progress(f"one query at a time at {size:,}, vectors of two parts")
        results["approximate_query_two_parts"] = two_part_latencies(data.vectors(size), queries)
    return results


def two_part_latencies(vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """One query at a time on an approximate index of the same vectors read as a bundle's
    embedding of style and fingerprint (the shipped model's share of fingerprint, each part
    at length 1/sqrt(2)): a search by style and one by fingerprint."""
    dimension = vectors.shape[1]
    spec = EmbeddingSpec(dimension, "synthetic", fingerprint_dimension=dimension * 15 // 32)
    index = VectorIndex.new(ORIGIN_MODEL, spec, chosen_parameters("approximate", len(vectors)))
    index.add(_two_parts(vectors, spec), pa.table({"uri": pa.nulls(len(vectors), pa.string())}))
    return query_latencies_ms(index, _two_parts(queries, spec))


def _two_parts(vectors: np.ndarray, spec: EmbeddingSpec) -> np.ndarray:
    parts = [spec.part(vectors, name) for name in (STYLE, FINGERPRINT)]
    return np.concatenate(parts, axis=1) / np.sqrt(2.0)


def by_nprobe(
    index: VectorIndex, truth: np.ndarray, queries: np.ndarray, timed: bool
) -> dict[str, Any]:
    """Recall@K (and, if `timed`, one query's latency) at each of NPROBES."""
    built = index.manifest
    assert built.approximate is not None
    figures = {}
    for nprobe in NPROBES:
        index.manifest = replace(built, approximate=replace(built.approximate, nprobe=nprobe))
        figures[str(nprobe)] = {
            f"recall_at_{K}": recall_at_k(index, truth, queries),
            **(query_latencies_ms(index, queries) if timed else {}),
        }
    index.manifest = built
    return figures


def measure_duplicates(index: VectorIndex, planted: set[tuple[int, int]]) -> dict[str, Any]:
    """The approximate index's near pairs, at the copies' distance: time, and the planted
    copies found (the synthetic data has no other pairs that near)."""
    started = time.perf_counter()
    pairs = index.near_pairs(max_distance=0.01)
    seconds = time.perf_counter() - started
    found = set(zip(pairs.column("id_a").to_pylist(), pairs.column("id_b").to_pylist(),
                    strict=True))  # fmt: skip
    return {
        "seconds": seconds,
        "pairs": len(pairs),
        "planted": len(planted),
        "planted_found_share": len(found & planted) / len(planted) if planted else None,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def _progress(section: str) -> None:
    print(f"bench.similar: {section} ...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = SyntheticEmbeddings(args.dimension, args.latent_dimension)
    queries = data.chunk(0, args.queries, stream=1)
    results: dict[str, Any] = {
        "machine": _machine(),
        "dimension": args.dimension,
        "latent_dimension": args.latent_dimension,
        "load_average_1min_before": os.getloadavg()[0],
    }
    _progress("the exact search's one query as it grows")
    results |= measure_exact_curve(data, queries, args.exact_sizes)
    write_results(results, Path(args.output))
    with tempfile.TemporaryDirectory(prefix="artstyle-similar-") as scratch:
        for i, size in enumerate(args.sizes):
            results[str(size)] = measure_size(data, size, queries, args, Path(scratch), i == 0)
            results[f"load_average_1min_after_{size}"] = os.getloadavg()[0]
            # Each size as it is done: 1,000,000 takes long.
            write_results(results, Path(args.output))
    print(json.dumps(results, indent=2))
    return results


def _machine() -> dict[str, Any]:
    import faiss

    return {"cpu_count": os.cpu_count(), "faiss": faiss.__version__,
            "faiss_simd": faiss.get_compile_options().strip()}  # fmt: skip


if __name__ == "__main__":
    main()
