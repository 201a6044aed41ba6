"""Which engine runs the classifier when `--engine auto` (the default) leaves it open.

On a CPU, OpenVINO computes what Keras computes: in float32 the same function (to 2e-6 on
`val`), in bfloat16 the same rounding (the backbone in bfloat16, the head in float32: the
same `val` scores as Keras's). It does so at least as fast (OpenVINO's bfloat16 took 9% less
CPU a painting than Keras's on a 2-core AMX Xeon), chooses its arithmetic by the same rule
with a measurement of its own, and its process never imports TensorFlow: a one-batch run
ends in 3.0 s where Keras's takes 9.6 s on a 2-core EPYC, in 0.7 GB instead of 1.4 GB.
Its first run with a bundle converts the model, once per machine.

Keras remains where OpenVINO's CPU plugin is not the fast path or the start-up is not one a
user waits for: on a GPU, and where the model runs in worker processes (Beam's
multi_processing mode, portable runners, Dataflow), whose workers may have GPUs, and where
Beam's worker processes with OpenVINO loaded ended with an abseil check-failure line on
stderr in 2 of 6 runs here (after writing every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run's classifier runs on, and why: for the log and for summary.json."""

    engine: str  # "keras" or "openvino"
    reason: str

    def __str__(self) -> str:
        return f"{self.engine} chosen: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"engine": self.engine, "reason": self.reason}


def gpu_device_present(devices: str = "/dev") -> bool:
    """An NVIDIA GPU's device files, seen without loading TensorFlow (which may still not use
    it: a build without CUDA)."""
    return any(Path(devices).glob("nvidia[0-9]*"))


def choose_engine(asked: str, in_this_process: bool) -> EngineChoice:
    """`in_this_process`: whether the model runs in this process (the direct runner in
    memory or in threads) rather than in workers of its own."""
    if asked != "auto":
        return EngineChoice(asked, f"asked for (--engine {asked})")
    if not in_this_process:
        return EngineChoice("keras", "the model runs in worker processes, or on other machines")
    if gpu_device_present():
        return EngineChoice("keras", "a GPU is here")
    return EngineChoice(
        "openvino", "on this CPU it computes Keras's results without TensorFlow's start-up"
    )
