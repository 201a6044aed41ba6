"""Engines a user could run the classifier on instead of TensorFlow, timed and scored beside it.

- ONNX Runtime: the float32 classifier exported by Keras (through tf2onnx).
- OpenVINO's CPU plugin: the float32 classifier converted as `--engine openvino` converts
  it, run in float32 and, where the CPU has bfloat16 instructions, in bfloat16: the whole
  model, and as `--engine openvino` runs it, with the head in float32.
- OpenVINO int8: NNCF's post-training quantization of that model, calibrated on
  paintings of the catalog's `train` split (the CPU's VNNI or AMX int8 instructions).

Each is one more `ModelPath`, so the benchmark times them exactly as it times TensorFlow's
paths, in the same run, and scores them on the same `val` paintings. OpenVINO is installed
with artstyle; ONNX Runtime and NNCF are the `[engines]` extra: where one is missing, the
benchmark says so instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from bench.measure import ModelPath, per_batch
from models.metrics import Scoreboard
from models.openvino_engine import (
    OPENVINO_CONFIG,
    compiled_classifier,
    converted_model,
    imported_openvino,
)

INSTALL_HINT = "not installed (pip install -e '.[engines]')"


def engine_path_name(engine: str, precision: str) -> str:
    """The name `engine_paths` (or Keras's paths beside them) gives what `python -m pipeline
    --engine ENGINE --precision PRECISION` runs: OpenVINO's bfloat16 keeps the head in
    float32."""
    if (engine, precision) == ("openvino", "bfloat16"):
        return "openvino_bfloat16_head_float32"
    return f"{engine}_{precision}"


def engine_paths(
    model: keras.Model, batch_size: int, calibration: np.ndarray, folder: str
) -> tuple[dict[str, ModelPath], dict[str, str]]:
    """The float32 classifier `model` on every other engine installed here, by name; and,
    by name, why an engine is not among them."""
    paths: dict[str, ModelPath] = {}
    missing: dict[str, str] = {}
    onnx_runtime = onnx_runtime_path(model, batch_size, folder)
    if isinstance(onnx_runtime, str):
        missing["onnxruntime_float32"] = onnx_runtime
    else:
        paths["onnxruntime_float32"] = onnx_runtime
    converted = converted_model(model)
    core = imported_openvino().Core()
    paths["openvino_float32"] = openvino_path(core, converted, "f32", batch_size)
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        paths["openvino_bfloat16"] = openvino_path(core, converted, "bf16", batch_size)
        try:
            head_float32 = compiled_classifier(core, converted, "bfloat16")
        except ValueError as error:  # a model without a style head to cut at
            missing["openvino_bfloat16_head_float32"] = str(error)
        else:
            paths["openvino_bfloat16_head_float32"] = _batchwise(
                head_float32.predict_on_batch, batch_size
            )
    else:
        missing["openvino_bfloat16"] = "not native on this CPU"
    try:
        quantized = openvino_int8(converted, calibration, batch_size)
    except ImportError:
        missing["openvino_int8"] = INSTALL_HINT
    else:
        paths["openvino_int8"] = openvino_path(core, quantized, "f32", batch_size)
    return paths, missing


def onnx_runtime_path(model: keras.Model, batch_size: int, folder: str) -> ModelPath | str:
    """The float32 classifier exported to ONNX (Keras's own export, through tf2onnx) and run
    by ONNX Runtime batch by batch; or, where that cannot run here, why."""
    try:
        import onnxruntime
    except ImportError:
        return INSTALL_HINT
    path = str(Path(folder) / "classifier.onnx")
    shape = (None, *model.input.shape[1:])
    model.export(
        path, format="onnx", input_signature=[keras.InputSpec(shape=shape, dtype="float32")]
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _batchwise(lambda batch: session.run(None, {name: batch})[0], batch_size)


def openvino_path(core, converted, precision_hint: str, batch_size: int) -> ModelPath:
    """`converted` compiled for this CPU, computing in `precision_hint` ('f32', 'bf16'; an
    int8 model's quantized layers are int8 whatever the hint)."""
    config = {**OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": precision_hint}
    compiled = core.compile_model(converted, "CPU", config)
    return _batchwise(lambda batch: compiled(batch)[0], batch_size)


def openvino_int8(converted, calibration: np.ndarray, batch_size: int):
    """NNCF's default post-training quantization (int8 weights and activations, statistics
    from `calibration`, fast bias correction), calibrated on paintings the head was
    trained on, never on the `val` paintings it is scored on."""
    import nncf

    batches = [
        calibration[start : start + batch_size].astype(np.float32)
        for start in range(0, len(calibration), batch_size)
    ]
    return nncf.quantize(converted, nncf.Dataset(batches), subset_size=len(batches))


def _batchwise(run: Callable[[np.ndarray], np.ndarray], batch_size: int) -> ModelPath:
    """Keras casts decoded uint8 images itself; these engines want float32."""
    return lambda x: per_batch(lambda batch: run(batch.astype(np.float32)), x, batch_size)


def top_k_scores(
    paths: dict[str, ModelPath], images: np.ndarray, labels: Sequence[str], classes: Sequence[str]
) -> dict[str, float]:
    """Per path: top-1 and top-3 accuracy in percent over `images` (whose length is a
    multiple of the paths' batch size), counted as the pipeline counts them, and each one's
    change from the first path, the reference (Keras in float32)."""
    results: dict[str, float] = {}
    reference: dict[int, float] = {}
    for name, predict in paths.items():
        scoreboard = Scoreboard(tuple(classes))
        scoreboard.add_probabilities(labels, predict(images))
        scores = scoreboard.scores()
        for k in (1, 3):
            top_k = scores.top_k(k)
            assert top_k is not None, "every row ranks every style"
            score = 100 * top_k
            reference.setdefault(k, score)
            results[f"engine_{name}_top{k}"] = score
            results[f"engine_{name}_top{k}_change"] = score - reference[k]
    return results
