"""Which engine runs the classifier when `--engine auto` (the default) leaves it open.

On a CPU, OpenVINO computes what Keras computes: in float32 the same function, in bfloat16
the same rounding (the backbone in bfloat16, the head in float32), so the same scores on
`val`. It does so at least as fast, chooses its arithmetic by the same rule with a
measurement of its own, and its process never imports TensorFlow: a run starts seconds
sooner and holds about half the memory (the figures are in docs/benchmarks.md). Its first
run with a bundle converts the model, once per machine.

The choice is made for the machine the model runs on, not for the processes it runs in: a
catalog gets the same answers in this process as in Beam's worker processes here
(multi_processing mode, Prism). Keras remains on a GPU, where OpenVINO's CPU plugin is not
the fast path, and where the workers are other machines (Dataflow, a portable runner's job
service), which may have GPUs this machine cannot see.
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

    @classmethod
    def from_json(cls, data: dict[str, str]) -> EngineChoice:
        return cls(data["engine"], data["reason"])


def gpu_device_present(devices: str = "/dev") -> bool:
    """An NVIDIA GPU's device files, seen without loading TensorFlow (which may still not use
    it: a build without CUDA)."""
    return any(Path(devices).glob("nvidia[0-9]*"))


def choose_engine(asked: str, on_this_machine: bool) -> EngineChoice:
    """`on_this_machine`: whether the model runs on this machine (in this process or in
    worker processes of a local runner) rather than on workers elsewhere."""
    if asked != "auto":
        return EngineChoice(asked, f"asked for (--engine {asked})")
    if not on_this_machine:
        return EngineChoice("keras", "the model runs on other machines, which may have GPUs")
    if gpu_device_present():
        return EngineChoice("keras", "a GPU is here")
    return EngineChoice(
        "openvino", "on this CPU it computes Keras's results without TensorFlow's start-up"
    )
