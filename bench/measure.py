"""The benchmark's measurements, one function per section, each returning plain numbers.

Every function takes its inputs ready-made (a model, arrays, URIs, a catalog file), so a
test can run it on a handful of tiny images, and the CLI on thousands of real paintings.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bench.flags import REPO_ROOT
from models.bundle import ModelBundle
from models.cache import CACHE_DIR_VARIABLE
from models.fixed_batches import predict_in_fixed_batches
from transforms.evaluation import RunSummary
from transforms.fetch import read_file
from transforms.images import decode_image

# The model path the pipeline itself takes; the other paths are alternatives to it.
PIPELINE_PATH = "fixed_batches"

ModelPath = Callable[[np.ndarray], np.ndarray]  # (k * batch_size, size, size, 3) -> probabilities


# --- 1. The model alone --------------------------------------------------------------------


def model_paths(model: keras.Model, batch_size: int) -> dict[str, ModelPath]:
    """Ways to run the model over whole batches, the pipeline's own first.

    All compute the same function, but XLA fuses the graph differently, so each is compared
    with the pipeline's path before its speed means anything.
    """
    xla = tf.function(lambda batch: model(batch, training=False), jit_compile=True)
    return {
        PIPELINE_PATH: fixed_batches(model, batch_size),
        "predict_on_batch": lambda x: per_batch(model.predict_on_batch, x, batch_size),
        "xla": lambda x: per_batch(xla, x, batch_size),
    }


def fixed_batches(model: keras.Model, batch_size: int) -> ModelPath:
    """The pipeline's way to run a model (here also the classifier at another precision)."""
    return partial(predict_in_fixed_batches, model, batch_size=batch_size)


def per_batch(predict: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int) -> np.ndarray:
    """`predict` on each whole batch of `x` (whose length is a multiple of batch_size)."""
    batches = [x[start : start + batch_size] for start in range(0, len(x), batch_size)]
    return np.concatenate([np.asarray(predict(batch), np.float32) for batch in batches])


def tile_batches(images: np.ndarray, batch_size: int, n_batches: int) -> np.ndarray:
    """`n_batches` full batches cut from `images` repeated: a few decoded paintings are
    enough, since the model's cost does not depend on what the pixels show."""
    return np.resize(images, (batch_size * n_batches, *images.shape[1:]))


def raw_throughput(
    paths: dict[str, ModelPath],
    inputs: np.ndarray,
    batch_size: int,
    rounds: int = 1,
    prefix: str = "raw",
) -> dict:
    """Per path: images/s over `inputs`, the CPU time per image of this whole process (all
    of TensorFlow's threads) while it ran, the warm-up (tracing, compiling) it needed
    first, and its largest difference in probability from the first path's.

    Over several `rounds` the paths take turns, each running once over `inputs` per round,
    and each figure is the median of its rounds: a shared machine's load, which drifts,
    then weighs on every path alike. A path that cannot run this model (XLA has no kernel
    for some ops, such as the antialiased resize inside an ensemble) is reported as such,
    not timed; the first path must run.
    """
    results: dict[str, float | str] = {}
    runnable: dict[str, ModelPath] = {}
    for name, predict in paths.items():
        key = prefix if name == PIPELINE_PATH else f"{prefix}_{name}"
        try:
            results[f"{key}_warm_up_s"], _ = _timed(predict, inputs[:batch_size])
        except tf.errors.OpError as error:
            if name == next(iter(paths)):
                raise
            results[f"{key}_unsupported"] = error.message.splitlines()[0][:300]
            continue
        runnable[key] = predict
    rates, cpu_ms, outputs = defaultdict(list), defaultdict(list), {}
    for _ in range(rounds):
        for key, predict in runnable.items():
            cpu_started = time.process_time()
            seconds, outputs[key] = _timed(predict, inputs)
            rates[key].append(len(inputs) / seconds)
            cpu_ms[key].append(1e3 * (time.process_time() - cpu_started) / len(inputs))
    reference = outputs[next(iter(runnable))]
    for key in runnable:
        results[f"{key}_images_per_s"] = float(np.median(rates[key]))
        results[f"{key}_cpu_ms_per_image"] = float(np.median(cpu_ms[key]))
        if outputs[key] is not reference:
            results[f"{key}_max_abs_diff"] = float(np.max(np.abs(outputs[key] - reference)))
    return results


def _timed(function: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(x)
    return time.perf_counter() - started, result


# --- 2. Decoding alone ---------------------------------------------------------------------


def decode_throughput(uris: Sequence[str], size: int) -> dict[str, float]:
    """read_file + decode_image over `uris`, in this one thread.

    Wall-clock images/s is what one worker gets on this machine as it is now; images per
    CPU-second of this thread is what one core does, which holds even on a busy machine.
    """
    started, cpu_started = time.perf_counter(), time.thread_time()
    for uri in uris:
        decode_image(read_file(uri), size=size)
    wall_s, cpu_s = time.perf_counter() - started, time.thread_time() - cpu_started
    return {
        "decode_images_per_s": len(uris) / wall_s,
        "decode_images_per_s_per_core": len(uris) / cpu_s,
    }


# --- 3. The whole pipeline, as its own process ---------------------------------------------


@dataclass(frozen=True)
class ProcessRun:
    wall_s: float  # from just before the process starts until it has exited
    peak_rss_mb: float  # the kernel's high-water mark of its resident memory (VmHWM)
    cpu_s: float  # user + system time of all its threads


def write_results(results: dict[str, Any], path: Path) -> None:
    """A benchmark's results as JSON at `path`, its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def run_process(
    command: Sequence[str],
    log_path: Path,
    poll_s: float = 0.05,
    environment: Mapping[str, str] | None = None,
) -> ProcessRun:
    """Runs `command` from the repository root, its output to `log_path`, with
    `environment`'s variables set beside this process's own.

    Peak memory is the kernel's high-water mark of the child's resident memory (VmHWM in
    /proc/PID/status), read until it exits: the kernel updates it on every page fault, so
    no sampling interval can miss a peak; only the last `poll_s` of the run go unseen. The
    child's ru_maxrss (os.wait4) would be wrong here: Linux carries the memory of the
    process it was forked from (this one, with a model loaded) into it across exec. The
    pipeline runs in one process (the DirectRunner runs Beam's workers in-process). Its CPU
    time is what the children's rusage gained while it ran (one child at a time here).
    """
    cpu_before = _children_cpu_s()
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environment or {})},
        )
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, _high_water_kb(process.pid))
            time.sleep(poll_s)
        wall_s = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[:3]} exited with {process.returncode}:\n{tail}")
    return ProcessRun(wall_s, peak_kb / 1024, _children_cpu_s() - cpu_before)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _high_water_kb(pid: int) -> int:
    """VmHWM of a running process; 0 once it has exited (its memory is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class PipelineRun(ProcessRun):
    n_images: int
    n_errors: int
    engine: str  # what ran the model ("auto" is resolved by then)
    precision: str  # its arithmetic, resolved likewise


def run_pipeline(
    catalog: Path,
    output: Path,
    model: str,
    batch_size: int,
    precision: str,
    flags: Sequence[str] = (),
    environment: Mapping[str, str] | None = None,
) -> PipelineRun:
    """`python -m pipeline` over `catalog`, as a user runs it, with its summary's counts."""
    command = [sys.executable, "-m", "pipeline", f"--input={catalog}", f"--output={output}",
               f"--model={model}", f"--batch_size={batch_size}",
               f"--precision={precision}", *flags]  # fmt: skip
    process = run_process(command, output.with_suffix(".log"), environment=environment)
    summary = RunSummary.read(str(output / "summary.json"))
    assert summary.engine and summary.precision, "a run of this version says both"
    return PipelineRun(
        process.wall_s,
        process.peak_rss_mb,
        process.cpu_s,
        summary.n_images,
        summary.n_errors,
        summary.engine.engine,
        summary.precision.precision,
    )


def own_cache(folder: Path) -> dict[str, str]:
    """The environment of runs whose cache is `folder`/cache: the first run on OpenVINO there
    converts the model, whatever this machine's cache holds, and the later ones (on
    `--engine openvino` or the default engine) reuse that conversion, as a user's runs do."""
    return {CACHE_DIR_VARIABLE: str(folder / "cache")}


# What every run of `python -m pipeline` pays before any of its own work: starting Python,
# importing TensorFlow and Beam, and exiting again. Measured as the pipeline is, as a process.
FLOOR_COMMAND = (sys.executable, "-c", "import tensorflow, apache_beam")
# The same for `--engine openvino`, which runs without TensorFlow once the model is converted
# (and imports OpenVINO as the tool does, without its telemetry).
OPENVINO_FLOOR_COMMAND = (
    sys.executable,
    "-c",
    "import models.openvino_engine as engine, apache_beam; engine.imported_openvino()",
)
HELP_COMMAND = (sys.executable, "-m", "pipeline", "--help")


def pipeline_rates(startup_run: PipelineRun, run: PipelineRun) -> dict[str, float | None]:
    """Images/s with and without start-up, from a run over a tiny catalog and a larger one.

    Both runs pay the same fixed cost (process start, imports, graph construction, model
    load, and the end-of-run writes), so the extra images of the larger run over its extra
    seconds is the rate once images flow, and the tiny run's time less its images at that
    rate is the fixed cost: wall = startup + n / rate, through the two points. This needs no
    hook inside the pipeline. When the larger run is not measurably slower (too few extra
    images for the machine's noise), both are None rather than a meaningless number. The
    CPU time per image comes from the same two points: what the larger run's extra images
    cost all the process's threads (decoding, Beam, the model) together; None likewise.
    """
    extra_images = run.n_images - startup_run.n_images
    extra_s, extra_cpu_s = run.wall_s - startup_run.wall_s, run.cpu_s - startup_run.cpu_s
    rate = extra_images / extra_s if extra_s > 0 else None
    return {
        "images_per_s": rate,
        "images_per_s_with_startup": run.n_images / run.wall_s,
        "startup_s": startup_run.wall_s - startup_run.n_images / rate if rate else None,
        "cpu_ms_per_image": 1e3 * extra_cpu_s / extra_images if extra_cpu_s > 0 else None,
    }


# --- 4. A fresh model per image --------------------------------------------------------------


def reload_throughput(uris: Sequence[str], bundle_path: str) -> float:
    """Images/s when every image loads the model, predicts, and drops it, as a web demo
    that loads its model per request does: what batching and loading once are worth.
    Keras's global state is cleared after each, as a fresh request would find it, so the
    last image costs what the first did."""
    started = time.perf_counter()
    for uri in uris:
        bundle = ModelBundle.load(bundle_path)
        image = decode_image(read_file(uri), size=bundle.input_size)
        bundle.classifier().predict_on_batch(image[np.newaxis])
        keras.utils.clear_session()
    return len(uris) / (time.perf_counter() - started)
