"""Which engine runs the classifier when `--engine auto` (the default) leaves it open.

Keras and OpenVINO compute the same function in float32 (to 2e-6 on `val`). What differs is
what a run pays around it:

- start-up: a process on OpenVINO never imports TensorFlow, so a one-batch run ends in 4.5 s
  where Keras's takes 11 s (a 2-core EPYC; the first run on OpenVINO converts the model,
  once per machine);
- arithmetic: Keras's bfloat16 runs the backbone 1.6-1.8 x faster than float32 where it
  pays (AMX, some CPUs with AVX512_BF16, GPUs), and OpenVINO's own bfloat16 moves top-1 on
  `val` too far to be used unasked.

So OpenVINO wherever Keras would compute in float32, and for catalogs too small for
bfloat16 to repay TensorFlow's start-up; Keras on a GPU, where bfloat16 is asked for, for
big catalogs where bfloat16 pays or is still to be measured, and wherever the workers are
other machines.

Worker processes (Beam's multi_processing mode, portable runners, Dataflow) get Keras: their
start-up is not the one a user waits for, a worker may have a GPU, and Beam's worker
processes with OpenVINO loaded ended with an abseil check failure on stderr in 2 of 6 runs
here (after writing every row).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.precision import foreseen_precision, gpu_device_present
from models.settings import SMALL_CATALOG


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run's classifier runs on, and why: for the log and for summary.json."""

    engine: str  # "keras" or "openvino"
    reason: str

    def __str__(self) -> str:
        return f"{self.engine} chosen: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"engine": self.engine, "reason": self.reason}


def choose_engine(
    asked: str, precision: str, model_id: str, images: int | None, in_this_process: bool
) -> EngineChoice:
    """`images`: the catalog's size where it could be counted (None: unknown, or only known
    to be at least SMALL_CATALOG); `in_this_process`: whether the model runs in this process
    (the direct runner in memory or in threads) rather than in workers of its own."""
    if asked != "auto":
        return EngineChoice(asked, f"asked for (--engine {asked})")
    if not in_this_process:
        return EngineChoice("keras", "the model runs in worker processes, or on other machines")
    if gpu_device_present():
        return EngineChoice("keras", "a GPU is here")
    if precision == "bfloat16":
        return EngineChoice("keras", "bfloat16 asked for: Keras's rounds the backbone alone")
    keras_precision = foreseen_precision(precision, model_id)
    if keras_precision is not None and keras_precision.precision == "float32":
        return EngineChoice(
            "openvino",
            f"Keras would compute in float32 ({keras_precision.reason}): the same results "
            "without TensorFlow's start-up",
        )
    if images is not None and images < SMALL_CATALOG:
        return EngineChoice(
            "openvino", f"{images} images, too few for bfloat16 to repay TensorFlow's start-up"
        )
    catalog = "a catalog of unknown size" if images is None else f"{SMALL_CATALOG}+ images"
    if keras_precision is None:
        return EngineChoice("keras", f"{catalog}, and bfloat16's speed here still to measure")
    return EngineChoice("keras", f"{catalog}, and bfloat16 ({keras_precision.reason})")
