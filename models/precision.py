"""The backbone's arithmetic: float32, or bfloat16 where the hardware runs it natively.

On a CPU with bfloat16 instructions (AVX512_BF16, AMX) oneDNN runs the backbone's
convolutions about three times as fast in bfloat16; the weights stay float32 (Keras's
mixed policy) and so do the head and its softmax, so only the features are rounded. Where
the CPU lacks those instructions TensorFlow emulates bfloat16 in float32: slower, not
faster. GPUs run it natively.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import tensorflow as tf

PRECISIONS = ("auto", "float32", "bfloat16")
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def cpu_bfloat16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU flag that makes bfloat16 native here, or None (also where there is no
    /proc/cpuinfo to read: the safe answer is float32)."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return next((flag for flag in BFLOAT16_CPU_FLAGS if flag in flags), None)


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bfloat16' on a GPU or a CPU with native bfloat16, else 'float32'.

    Resolved where the model is loaded (each worker), not where the pipeline is launched:
    the two machines may differ.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    native = cpu_bfloat16_flag() or tf.config.list_physical_devices("GPU")
    return "bfloat16" if native else "float32"


@contextmanager
def building_in(precision: str) -> Iterator[None]:
    """Layers built inside compute in `precision` ('float32' or 'bfloat16'); Keras's global
    policy is restored after, so layers built later are float32 again."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
