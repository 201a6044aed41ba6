"""The backbone's arithmetic, float32 or bfloat16, and which one `--precision auto` picks.

In bfloat16 the backbone's convolutions run in bfloat16 while the weights stay float32
(Keras's mixed policy); the head and its softmax stay float32: only the features are
rounded, and the scores on `val` move by a fraction of a point. Whether that is faster
depends on the machine (docs/benchmarks.md has the figures):

- a GPU, or a CPU with AMX: bfloat16, by rule: it is faster there;
- a CPU with AVX512_BF16 but no AMX: no rule holds. bfloat16 was faster than float32 on an
  AMD EPYC and slower on an Intel Xeon, both with the flag. So `auto` times both on this
  machine, once, and keeps the answer in a cache (`PrecisionCache`);
- a CPU without bfloat16 instructions: float32 (TensorFlow would emulate bfloat16, slower).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.cache import cache_dir, write_atomically
from models.settings import PRECISIONS

if TYPE_CHECKING:
    import keras

AMX_FLAG = "amx_bf16"
BFLOAT16_CPU_FLAGS = (AMX_FLAG, "avx512_bf16")  # the first one present is reported
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}

# bfloat16 rounds the features, and a short timing on a shared machine is rough, so bfloat16
# must be clearly faster to be chosen; the CPUs measured so far were far from this either way.
MIN_BFLOAT16_SPEEDUP = 1.1

Speedup = Callable[[], float]  # measures bfloat16's images/s over float32's on this machine


@dataclass(frozen=True)
class PrecisionChoice:
    """The arithmetic a model is built in, and why: for the log and for summary.json."""

    precision: str  # "float32" or "bfloat16"; as asked, where each worker resolves its own
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} chosen: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"precision": self.precision, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> PrecisionChoice:
        return cls(data["precision"], data["reason"])


def cpu_bfloat16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU flag that makes bfloat16 native here (AMX's first), or None (also where there
    is no /proc/cpuinfo to read: the safe answer is float32)."""
    flags = set(_cpuinfo_field(cpuinfo, "flags").split())
    return next((flag for flag in BFLOAT16_CPU_FLAGS if flag in flags), None)


def _cpuinfo_field(cpuinfo: str, name: str) -> str:
    """The first `name : value` line's value in /proc/cpuinfo, or '' where there is none."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def resolve_precision(
    precision: str, speedup: Speedup | None = None, model_id: str = "", cpu_only: bool = False
) -> PrecisionChoice:
    """'float32' and 'bfloat16' as asked; 'auto' by the hardware's rule where it has one,
    else by `speedup` (cached per machine and model), else float32. `cpu_only`: for an
    engine that runs on the CPU whatever GPU there is.

    Resolved where the model is loaded (each worker), not where the pipeline is launched:
    the two machines may differ.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return PrecisionChoice(precision, f"asked for (--precision {precision})")
    if not cpu_only and _has_gpu():
        return PrecisionChoice("bfloat16", "a GPU computes it natively")
    flag = cpu_bfloat16_flag()
    if flag is None:
        return PrecisionChoice(
            "float32", "this CPU has no bfloat16 instructions (AVX512_BF16 or AMX)"
        )
    if flag == AMX_FLAG:
        return PrecisionChoice("bfloat16", "this CPU has AMX")
    if speedup is None:
        return PrecisionChoice("float32", "AVX512_BF16 without AMX, and not measured here")
    return choice_by_speedup(PrecisionCache().speedup(model_id, speedup))


def _has_gpu() -> bool:
    import tensorflow as tf  # here: only 'auto' asks, and the OpenVINO engine runs without it

    return bool(tf.config.list_physical_devices("GPU"))


def grow_gpu_memory_on_demand() -> None:
    """TensorFlow takes all of a GPU's memory when it first touches it, so a second process
    on the same GPU (another SDK process of a Dataflow worker) would fail to load its model.
    Growing on demand lets processes share the GPU; it must be set before TensorFlow uses
    the device, so a worker's loader of a Keras model calls it before building."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        # RuntimeError: the device is already in use, and its setting can no longer change.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)


def choose_precision(
    precision: str, build: Callable[[str], keras.Model], model_id: str
) -> PrecisionChoice:
    """`resolve_precision`, measuring (where it must) the classifiers `build(precision)`
    makes: the one way a pipeline's launcher and its workers resolve `auto`."""
    return resolve_precision(precision, partial(measured_speedup, build), model_id)


def choice_by_speedup(speedup: float) -> PrecisionChoice:
    if speedup >= MIN_BFLOAT16_SPEEDUP:
        return PrecisionChoice("bfloat16", f"{speedup:.2f} x float32 measured on this CPU")
    return PrecisionChoice("float32", f"bfloat16 measured at {speedup:.2f} x float32 on this CPU")


class PrecisionCache:
    """bfloat16's measured speedup per machine and model, in one JSON file of the user's
    cache folder, so that only the first run on a machine pays for the measurement.

    The key is the CPU's model name and flags, TensorFlow's and Keras's versions and the
    model's id: a different CPU, library or model is measured afresh. A cache that cannot
    be read or written costs a measurement per run, never a failed run.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "precision.json"

    def speedup(self, model_id: str, measure: Speedup) -> float:
        entries, key = self._read(), machine_key(model_id)
        try:
            return float(entries[key]["speedup"])
        except (KeyError, TypeError, ValueError):
            pass  # not measured here yet, or a garbled entry: measured now, and mended
        value = measure()
        entries[key] = {
            "speedup": value,
            "cpu": _cpuinfo_field("/proc/cpuinfo", "model name"),
            "tensorflow": metadata.version("tensorflow"),
            "model": model_id,
        }
        try:
            write_atomically(self.path, json.dumps(entries, indent=2).encode())
        except OSError as error:
            logging.warning("artstyle: cannot cache the precision measurement: %s", error)
        return value

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def machine_key(model_id: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    parts = (_cpuinfo_field(cpuinfo, "model name"), _cpuinfo_field(cpuinfo, "flags"),
             metadata.version("tensorflow"), metadata.version("keras"), model_id)  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def measured_speedup(
    build: Callable[[str], Any],
    batch_size: int = 8,
    rounds: int = 3,
    input_shape: tuple[int, ...] | None = None,
) -> float:
    """bfloat16's images/s over float32's, for the models `build(precision)` makes, on
    random images of `input_shape` (default: a Keras model's input): one warm-up batch each
    (tracing), then `rounds` batches each, alternated, and each one's fastest batch (another
    process's load only ever adds time)."""
    models = {precision: build(precision) for precision in ("float32", "bfloat16")}
    shape = (batch_size, *(input_shape or models["float32"].input.shape[1:]))
    images = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    for model in models.values():
        model.predict_on_batch(images)
    fastest = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for precision, model in models.items():
            started = time.perf_counter()
            model.predict_on_batch(images)
            fastest[precision] = min(fastest[precision], time.perf_counter() - started)
    return fastest["float32"] / fastest["bfloat16"]


@contextmanager
def building_in(precision: str) -> Iterator[None]:
    """Layers built inside compute in `precision` ('float32' or 'bfloat16'); Keras's global
    policy is restored after, so layers built later are float32 again."""
    import keras

    if precision not in _POLICIES:
        raise ValueError(f"A model is built in float32 or bfloat16, not {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
