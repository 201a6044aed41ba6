"""The benchmarks' flags, apart from the benchmarks: --help and a bad flag answer before
they load TensorFlow. The flags they share with the commands they measure are the commands'
own (pipeline.flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import called_as
from pipeline.flags import (
    BATCH_SIZE,
    FETCH_CONCURRENCY,
    MODEL,
    OUTPUT,
    PRECISION,
    VERBOSE_EPILOG,
    add,
    flag,
)

ABOUT = "Every measurement of the pipeline in one run, printed as a table and written as JSON."
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "wikiart16"
# The other benchmarks, each a command of its own: `python -m bench NAME` runs bench.NAME.
OTHER_BENCHES = {
    "serve": "the service under load, against the batch pipeline",
    "serve_similar": "POST /similar against POST /predict, on one service with --index",
    "large_catalog": "whether memory stays flat as a catalog grows tenfold",
    "similar": "the nearest-neighbour index: its build, memory, one query and recall",
    "similar_quality": "duplicates and style neighbours found by a model's embeddings, on "
    "real paintings and their altered copies",
    "embedding_choice": "the measurements that chose the embedding's style and fingerprint",
}

JSON_OUTPUT = OUTPUT.but(help="The JSON file to write.", required=True)
DATA = flag("--data", "A folder with catalog.csv (uri, style).", type=Path, default=DEFAULT_DATA)


def epilog() -> str:
    others = "; ".join(f"{name}: {about}" for name, about in OTHER_BENCHES.items())
    return (
        f"Other benchmarks, each a command of its own ({called_as('bench')} NAME --help): "
        f"{others}. {VERBOSE_EPILOG}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=called_as("bench"), description=ABOUT, epilog=epilog())
    add(parser, JSON_OUTPUT)
    parser.add_argument("--images", type=int, default=2000, help="N: the pipeline's catalog.")
    add(parser, MODEL, BATCH_SIZE, PRECISION, DATA)
    parser.add_argument(
        "--large_images", type=int, default=8000, help="The catalog for memory growth."
    )
    parser.add_argument("--skip_large", action="store_true", help="No large run (quick runs).")
    parser.add_argument(
        "--fetch_images",
        type=int,
        default=2000,
        help="Paintings read from disk and over HTTP at 50 and 200 ms per request, and with "
        "faults.",
    )
    add(parser, FETCH_CONCURRENCY.but("Here: in the runs over HTTP."))
    parser.add_argument(
        "--fetch_small_catalogs",
        type=int,
        nargs="+",
        default=[100, 400],
        help="Rows of the small catalogs whose whole runs are timed from disk and over HTTP.",
    )
    parser.add_argument(
        "--fetch_rounds",
        type=int,
        default=3,
        help="Turns each small catalog takes from disk, over HTTP and with faults; the "
        "median is used.",
    )
    parser.add_argument("--skip_fetch", action="store_true", help="No HTTP runs.")
    parser.add_argument(
        "--reload_images", type=int, default=200, help="Images for the model-per-image way."
    )
    parser.add_argument(
        "--decode_images", type=int, default=500, help="Images to decode (at most N)."
    )
    parser.add_argument("--raw_batches", type=int, default=8, help="Batches per model path timed.")
    parser.add_argument("--skip_engines", action="store_true", help="No other engines.")
    parser.add_argument(
        "--engine_rounds",
        type=int,
        default=3,
        help="Turns each engine takes over --raw_batches batches; the median one is used.",
    )
    parser.add_argument(
        "--calibration_images",
        type=int,
        default=300,
        help="'train' paintings that calibrate the int8 quantization.",
    )
    parser.add_argument(
        "--val_images",
        type=int,
        default=None,
        help="'val' paintings every engine is scored on (default: all of them).",
    )
    parser.add_argument(
        "--startup_runs",
        type=int,
        default=3,
        help="One-batch runs for the start-up time, each beside a run of the floor (importing "
        "TensorFlow and Beam) and of --help, on --engine openvino beside its floor, and on "
        "the default engine; the median of each is used.",
    )
    args = parser.parse_args(argv)
    if args.startup_runs < 1:
        parser.error("--startup_runs must be at least 1")
    if args.fetch_rounds < 1:
        parser.error("--fetch_rounds must be at least 1")
    if args.images <= args.batch_size:
        parser.error("--images must exceed --batch_size: a batch is the start-up run's catalog")
    return args
