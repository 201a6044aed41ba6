"""`python -m bench`: every measurement of the pipeline in one run, printed as a table and
written as JSON.

The sections run one after the other, never side by side, so none slows another:

1. the model alone (in both arithmetics, and which one `--precision auto` picks here);
2. the other engines a user could run it on (timed in turns with TensorFlow, and scored on
   the `val` paintings; --skip_engines leaves them out);
3. decoding alone;
4. the pipeline as a user runs it: a tiny catalog, N images, and optionally many more; its
   start-up beside the floor of importing TensorFlow and Beam, and `--help`; the start-up
   on `--engine openvino` beside its own floor, and on the default engine;
5. the pipeline over HTTP at two latencies, against the same paintings from disk
   (bench/fetch.py; --skip_fetch leaves it out);
6. the model alone again, so that the pipeline is compared with the mean of two timings
   that bracket it;
7. a fresh model per image, as a demo that loads its model per request runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.engines import engine_path_name, engine_paths, top_k_scores
from bench.fetch import measure_fetch
from bench.flags import parse_args
from bench.measure import (
    FLOOR_COMMAND,
    HELP_COMMAND,
    OPENVINO_FLOOR_COMMAND,
    PIPELINE_PATH,
    PipelineRun,
    decode_throughput,
    fixed_batches,
    model_paths,
    own_cache,
    pipeline_rates,
    raw_throughput,
    reload_throughput,
    run_pipeline,
    run_process,
    tile_batches,
    write_results,
)
from models.bundle import ModelBundle
from models.precision import (
    BFLOAT16_CPU_FLAGS,
    choose_precision,
    cpu_bfloat16_flag,
    measured_speedup,
)
from transforms.fetch import read_file
from transforms.images import decode_image


def sample_catalog(data: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """`n` rows of `data`/catalog.csv with absolute URIs, in a seeded shuffle, so that any
    prefix mixes styles and image sources (sizes) as the whole does; repeated when n is
    larger than the catalog. Every run's catalog is a prefix of this one."""
    catalog = pd.read_csv(data / "catalog.csv", dtype=str, keep_default_na=False)
    order = np.random.default_rng(seed).permutation(len(catalog))
    rows = catalog.iloc[np.resize(order, n)].reset_index(drop=True)
    folder = str(data.resolve())
    rows["uri"] = [os.path.join(folder, uri) for uri in rows["uri"]]
    return rows


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bundle = ModelBundle.load(args.model)
    n_catalog = args.images if args.skip_large else max(args.images, args.large_images)
    catalog = sample_catalog(args.data, n_catalog)
    uris = catalog["uri"].tolist()
    results: dict[str, Any] = {
        "model": bundle.id,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "load_average_1min_before": os.getloadavg()[0],
    }
    _progress("the model alone")
    model_results, time_model_again = measure_model(
        bundle, uris[: args.batch_size], args.batch_size, args.raw_batches, args.precision
    )
    results |= model_results
    if not args.skip_engines:
        _progress("other engines, and their scores on 'val'")
        results |= measure_engines(bundle, args, uris[: args.batch_size])
    _progress("decoding alone")
    decode_uris = uris[: min(args.images, args.decode_images)]
    results |= decode_throughput(decode_uris, bundle.input_size)
    results["decode_images"] = len(decode_uris)
    _progress("the pipeline")
    with tempfile.TemporaryDirectory(prefix="artstyle-bench-") as folder:
        pipeline_results, startup = measure_pipeline(catalog, args, Path(folder))
        results |= pipeline_results
        if not args.skip_fetch:
            _progress("the pipeline over HTTP, against disk")
            fetch_catalog = catalog.head(args.fetch_images)
            root = args.data.resolve()
            results |= measure_fetch(
                fetch_catalog, root, Path(folder), args, startup, args.fetch_concurrency
            )
    _progress("the model alone, again")
    results |= bracketed_raw(results["raw_images_per_s"], time_model_again())
    _progress("a fresh model per image")
    reload_uris = uris[: args.reload_images]
    results["reload_images_per_s"] = reload_throughput(reload_uris, args.model)
    results["reload_images"] = len(reload_uris)
    results |= comparisons(results)
    results["load_average_1min_after"] = os.getloadavg()[0]
    return results


def measure_model(
    bundle: ModelBundle, uris: list[str], batch_size: int, n_batches: int, precision: str
) -> tuple[dict, Callable[[], float]]:
    """The classifier's paths over `n_batches` batches tiled from one batch of paintings;
    and a function that times the pipeline's path again, for after the pipeline's runs.

    `precision` is resolved as the pipeline resolves it (and logs why); the other one is
    timed too where bfloat16 is native (elsewhere TensorFlow emulates it: a timing of the
    emulation would mean nothing), and so is the short measurement `auto` makes where the
    CPU leaves doubt, to set beside these longer ones."""
    images = decode_paintings(uris, bundle.input_size)
    build = partial(bundle.classifier, None)
    choice = choose_precision(precision, build, bundle.id)
    paths = model_paths(bundle.classifier(precision=choice.precision), batch_size)
    other = "float32" if choice.precision == "bfloat16" else "bfloat16"
    flag = cpu_bfloat16_flag()
    if flag:
        paths[other] = fixed_batches(bundle.classifier(precision=other), batch_size)
    inputs = tile_batches(images, batch_size, n_batches)
    results: dict[str, Any] = {
        "precision": choice.precision,
        "precision_reason": choice.reason,
        "bfloat16_speedup_short_measurement": measured_speedup(build) if flag else None,
        **raw_throughput(paths, inputs, batch_size),
        "raw_images": len(inputs),
        "bfloat16": flag or f"not native (no {' or '.join(BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo)",
    }

    def time_again() -> float:
        pipeline_path = {PIPELINE_PATH: paths[PIPELINE_PATH]}
        return raw_throughput(pipeline_path, inputs, batch_size)["raw_images_per_s"]

    return results, time_again


def decode_paintings(uris: list[str], size: int) -> np.ndarray:
    return np.stack([decode_image(read_file(uri), size=size) for uri in uris])


def measure_engines(bundle: ModelBundle, args: argparse.Namespace, uris: list[str]) -> dict:
    """Keras in float32 (the reference) and in bfloat16 where it is native, then every other
    engine installed: timed in turns over the same batches (`--engine_rounds` medians), then
    scored on the `val` paintings of --data, the int8 one calibrated on `train` paintings."""
    catalog = labelled_splits(args.data, bundle.classes)
    calibration = decode_paintings(
        catalog[catalog["split"] == "train"]["uri"].tolist()[: args.calibration_images],
        bundle.input_size,
    )
    reference = bundle.classifier()
    paths = {"keras_float32": fixed_batches(reference, args.batch_size)}
    if cpu_bfloat16_flag():
        rounded = bundle.classifier(precision="bfloat16")
        paths["keras_bfloat16"] = fixed_batches(rounded, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="artstyle-engines-") as folder:
        others, missing = engine_paths(reference, args.batch_size, calibration, folder)
    paths |= others
    inputs = tile_batches(
        decode_paintings(uris, bundle.input_size), args.batch_size, args.raw_batches
    )
    timings = raw_throughput(paths, inputs, args.batch_size, args.engine_rounds, "engine")
    val = catalog[catalog["split"] == "val"]
    val = val.head(args.val_images) if args.val_images else val
    images = decode_paintings(val["uri"].tolist(), bundle.input_size)
    return {
        **{f"engine_{name}": why for name, why in missing.items()},
        "engine_calibration_images": len(calibration),
        **timings,
        "engine_val_images": len(val),
        **top_k_scores(paths, images, val["style"].tolist(), bundle.classes),
    }


def labelled_splits(data: Path, classes: tuple[str, ...]) -> pd.DataFrame:
    """`data`/catalog.csv's rows with a `split` and a style the model knows, absolute URIs."""
    catalog = pd.read_csv(data / "catalog.csv", dtype=str, keep_default_na=False)
    if "split" not in catalog:
        raise SystemExit(f"{data / 'catalog.csv'} has no 'split' column (use --skip_engines)")
    catalog = catalog[catalog["style"].isin(classes)].reset_index(drop=True)
    catalog["uri"] = [os.path.join(str(data.resolve()), uri) for uri in catalog["uri"]]
    return catalog


def bracketed_raw(before: float, after: float) -> dict[str, float]:
    """The model alone, timed before and after the pipeline's runs: the pipeline is compared
    with their mean, so a shared machine's load drifting between the two measurements
    moves the ratio less, and the gap between them shows how much it drifted."""
    return {
        "raw_images_per_s_before": before,
        "raw_images_per_s_after": after,
        "raw_images_per_s": (before + after) / 2,
    }


def measure_pipeline(
    catalog: pd.DataFrame, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any], PipelineRun]:
    """Start-up runs over one batch, a run over N images on Keras and one on the default
    engine, and optionally a large run on the default engine; and the median start-up run on
    the default engine, which the fetch section's runs (on that engine, in the same cache)
    leave out too.

    A one-batch run lasts about ten seconds, so one busy moment of the shared machine moves
    it by a quarter: the median of several is the start-up figure, and all are reported,
    beside the floor every run pays (Python importing TensorFlow and Beam, and exiting)
    and `python -m pipeline --help`, each run in turn with them. The same one-batch runs on
    `--engine openvino` beside their own floor (Beam and OpenVINO), after a first run that
    converts the model; and on the default engine, `auto`, which picks one of the two."""

    def run(n: int, engine: str = "keras") -> PipelineRun:
        path = folder / f"catalog-{n}.csv"
        catalog.head(n).to_csv(path, index=False)
        output = folder / f"run-{n}-{engine}"
        cache = own_cache(folder) if engine != "keras" else {}
        flags = [f"--engine={engine}"]
        return run_pipeline(path, output, args.model, args.batch_size, args.precision, flags, cache)

    conversion = run(args.batch_size, "openvino")
    floors, helps, startups = [], [], []
    openvino_floors, openvino_startups, default_startups = [], [], []
    for _ in range(args.startup_runs):  # in turns, so that the machine's load weighs alike
        floors.append(run_process(FLOOR_COMMAND, folder / "floor.log").wall_s)
        helps.append(run_process(HELP_COMMAND, folder / "help.log").wall_s)
        startups.append(run(args.batch_size))
        openvino_floors.append(run_process(OPENVINO_FLOOR_COMMAND, folder / "floor.log").wall_s)
        openvino_startups.append(run(args.batch_size, "openvino"))
        default_startups.append(run(args.batch_size, "auto"))
    startup, openvino_startup = median_run(startups), median_run(openvino_startups)
    default_startup = median_run(default_startups)
    main = run(args.images)
    default_main = run(args.images, "auto")
    large = None if args.skip_large else run(args.large_images, "auto")
    rates, default_rates = (
        pipeline_rates(startup, main),
        pipeline_rates(default_startup, default_main),
    )
    results = {
        "pipeline_images_per_s": rates["images_per_s"],
        "pipeline_images_per_s_with_startup": rates["images_per_s_with_startup"],
        "startup_s": rates["startup_s"],
        "pipeline_cpu_ms_per_image": rates["cpu_ms_per_image"],
        "startup_run_s": startup.wall_s,
        "startup_runs_s": sorted(one.wall_s for one in startups),
        "startup_floor_s": float(np.median(floors)),
        "startup_floor_runs_s": sorted(floors),
        "help_s": float(np.median(helps)),
        "help_runs_s": sorted(helps),
        "startup_openvino_run_s": openvino_startup.wall_s,
        "startup_openvino_runs_s": sorted(one.wall_s for one in openvino_startups),
        "startup_openvino_floor_s": float(np.median(openvino_floors)),
        "startup_openvino_floor_runs_s": sorted(openvino_floors),
        "openvino_conversion_run_s": conversion.wall_s,
        "startup_default_run_s": default_startup.wall_s,
        "startup_default_runs_s": sorted(one.wall_s for one in default_startups),
        "startup_default_engine": default_startup.engine,
        "peak_rss_mb_startup_openvino": openvino_startup.peak_rss_mb,
        "pipeline_run_s": main.wall_s,
        "pipeline_images": main.n_images,
        "pipeline_errors": main.n_errors,
        "peak_rss_mb_startup": startup.peak_rss_mb,
        "peak_rss_mb": main.peak_rss_mb,
        "pipeline_default_engine": default_main.engine,
        "pipeline_default_precision": default_main.precision,
        "pipeline_default_images_per_s": default_rates["images_per_s"],
        "pipeline_default_images_per_s_with_startup": default_rates["images_per_s_with_startup"],
        "pipeline_default_run_s": default_main.wall_s,
        "peak_rss_mb_default": default_main.peak_rss_mb,
    }
    return results | _large_results(default_startup, default_main, large), default_startup


def median_run(runs: list[PipelineRun]) -> PipelineRun:
    """The run of median wall time (of an even number, the slower of the middle two)."""
    return sorted(runs, key=lambda one: one.wall_s)[len(runs) // 2]


# What the large run adds; all None when it is skipped, so the JSON's keys never change.
LARGE_KEYS = (
    "large_images",
    "large_errors",
    "large_run_s",
    "peak_rss_mb_large",
    "peak_rss_large_vs_n",
    "pipeline_images_per_s_large",
)


def _large_results(
    startup: PipelineRun, main: PipelineRun, large: PipelineRun | None
) -> dict[str, Any]:
    """Memory growth from N to the large catalog, and whether throughput holds up there
    (`main` and `large` on the same engine, `startup` its one-batch run)."""
    if large is None:
        return dict.fromkeys(LARGE_KEYS)
    values = (
        large.n_images,
        large.n_errors,
        large.wall_s,
        large.peak_rss_mb,
        large.peak_rss_mb / main.peak_rss_mb,
        pipeline_rates(startup, large)["images_per_s"],
    )
    return dict(zip(LARGE_KEYS, values, strict=True))


def comparisons(results: dict[str, Any]) -> dict[str, float | None]:
    """The pipeline's rate (without start-up) against the model alone and the old way; and
    the model's share of the CPU time the pipeline spends on an image: where the model
    keeps every core busy, as on a CPU, that share is the most pipeline_vs_raw can be.

    Where the engines were timed, the same for the default engine: its pipeline against its
    model alone, and its model alone against Keras's float32 (each model alone as the
    engines section timed it, in turns with the others)."""
    pipeline, pipeline_cpu = results["pipeline_images_per_s"], results["pipeline_cpu_ms_per_image"]
    default = results["pipeline_default_images_per_s"]
    path = engine_path_name(
        results["pipeline_default_engine"], results["pipeline_default_precision"]
    )
    default_model = results.get(f"engine_{path}_images_per_s")  # None where engines were skipped
    keras_float32 = results.get("engine_keras_float32_images_per_s")
    return {
        "pipeline_vs_raw": pipeline / results["raw_images_per_s"] if pipeline else None,
        "raw_cpu_share_of_pipeline": (
            results["raw_cpu_ms_per_image"] / pipeline_cpu if pipeline_cpu else None
        ),
        "per_image_reload_vs_pipeline": (
            pipeline / results["reload_images_per_s"] if pipeline else None
        ),
        "pipeline_default_vs_its_model_alone": (
            default / default_model if default and default_model else None
        ),
        "default_model_alone_vs_keras_float32": (
            default_model / keras_float32 if default_model and keras_float32 else None
        ),
    }


def table(results: dict[str, Any]) -> str:
    """`metric | value`, one row per result, in the order they were measured."""
    width = max(len(key) for key in results)
    rows = [f"{'metric':<{width}} | value", f"{'-' * width}-|-{'-' * 12}"]
    rows += [f"{key:<{width}} | {_format(value)}" for key, value in results.items()]
    return "\n".join(rows)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def _progress(section: str) -> None:
    print(f"bench: measuring {section} ...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = benchmark(args)
    print(table(results))
    if results["pipeline_images_per_s"] is None:
        print("note: the N-image run was not slower than the start-up run; use more --images")
    write_results(results, Path(args.output))
    return results
