"""`python -m bench.large_catalog`: does memory stay flat as a catalog grows tenfold?

A sharded Parquet catalog of N rows (and one of N/10) points at a few hundred tiny
synthetic images, with pass-through columns like a museum's; the pipeline reads it with
two DirectRunner worker processes and writes sharded outputs. The figure is the peak
memory of the whole process tree (launcher and workers) of the large run against the
small one's. The model is EfficientNet-Lite0 with a small untrained head, made here:
the question is the pipeline's memory, not the shipped model's accuracy or speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.flags import JSON_OUTPUT, REPO_ROOT
from models.bundle import BackboneSpec, HeadSpec, Manifest, save_bundle
from pipeline.cli import called_as

DISTINCT_IMAGES = 256
STYLES = ("Baroque", "Cubism", "Impressionism")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.large_catalog"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="The large catalog's rows.")
    parser.add_argument("--shards", type=int, default=20, help="Parquet files per catalog.")
    JSON_OUTPUT(parser)
    return parser.parse_args(argv)


def tiny_bundle(folder: Path) -> str:
    """Lite0's pooled features into a seeded, untrained head: real computation, little of it."""
    from models.head import HeadConfig, build_head, merge_heads  # Keras: after --help

    features = np.random.default_rng(0).normal(size=(16, 1280)).astype(np.float32)
    head = merge_heads([build_head(features, len(STYLES), HeadConfig(seed=0))])
    manifest = Manifest(
        id="bench-lite0-pooled",
        version="0",
        backbone=BackboneSpec(name="efficientnet_lite0", input_size=224, feature_kind="pooled"),
        head=HeadSpec(temperature=1.0),
        classes=STYLES,
    )
    return save_bundle(str(folder / "bundle"), manifest, head).path


def synthetic_images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(DISTINCT_IMAGES):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path.name)
    return paths


def write_catalog(folder: Path, images: list[str], rows: int, shards: int) -> str:
    """`shards` Parquet files of `rows` rows in all, with relative URIs, labels, and a
    museum's columns; returns their glob."""
    folder.mkdir(parents=True)
    for shard, indices in enumerate(np.array_split(np.arange(rows), shards)):
        table = pa.table({
            "uri": [f"../images/{images[i % len(images)]}" for i in indices],
            "style": [STYLES[i % len(STYLES)] for i in indices],
            "accession": [f"1900.{i}" for i in indices],
            "year": pa.array(1500 + indices % 500, pa.int64()),
        })  # fmt: skip
        pq.write_table(table, folder / f"catalog-{shard:03d}.parquet")
    return str(folder / "catalog-*.parquet")


def peak_tree_rss_mb(command: list[str], poll_s: float = 0.2) -> tuple[float, float]:
    """(seconds, peak MB) of `command` and every process it starts, their resident memory
    summed at each poll (Beam's worker processes are children of the launcher)."""
    import psutil

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall it
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log)
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass  # a process ended between the listing and the reading
            time.sleep(poll_s)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(log.read().decode(errors="replace")[-3000:])
    return time.perf_counter() - started, peak / 2**20


def run(catalog: str, output: Path, bundle: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "pipeline", f"--input={catalog}", f"--output={output}",
               f"--model={bundle}", "--top_k=3", "--direct_num_workers=2",
               "--direct_running_mode=multi_processing"]  # fmt: skip
    seconds, peak_mb = peak_tree_rss_mb(command)
    from transforms.evaluation import RunSummary  # Beam: after --help

    summary = RunSummary.read(str(output / "summary.json"))
    shards = len(list(output.glob("predictions-*.parquet")))
    return {"rows": summary.n_images, "errors": summary.n_errors, "seconds": seconds,
            "peak_rss_mb": peak_mb, "prediction_shards": shards}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="artstyle-large-") as scratch:
        folder = Path(scratch)
        bundle = tiny_bundle(folder)
        (folder / "images").mkdir()
        images = synthetic_images(folder / "images")
        small_rows = args.rows // 10
        small = run(write_catalog(folder / "small", images, small_rows, args.shards),
                    folder / "out-small", bundle)  # fmt: skip
        large = run(write_catalog(folder / "large", images, args.rows, args.shards),
                    folder / "out-large", bundle)  # fmt: skip
    results = {"small": small, "large": large,
               "peak_rss_large_vs_small": large["peak_rss_mb"] / small["peak_rss_mb"]}  # fmt: skip
    print(json.dumps(results, indent=2))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
