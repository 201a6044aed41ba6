"""A RunInference ModelHandler for Keras 3 models, in the shape Beam's own handlers have.

Beam's TensorFlow handlers import tensorflow_hub and tf-keras; this one needs only Keras.
Every batch has the same shape (the last one is padded), so the compiled predict function
is traced once and reused, instead of Keras re-tracing or running eagerly per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

METRICS_NAMESPACE = "artstyle"


class KerasModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Runs a Keras model over fixed-size batches of equally shaped numpy arrays.

    `load` builds the model; it runs once per worker (Beam shares the loaded model across
    the worker's threads), so it must be a picklable, module-level callable such as
    `functools.partial(load_bundle_classifier, path)`.
    """

    def __init__(self, load: Callable[[], Any], batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._load = load
        self._batch_size = batch_size

    def load_model(self) -> Any:
        grow_gpu_memory_on_demand()
        return self._load()

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        outputs = predict_in_fixed_batches(model, np.stack(batch), self._batch_size)
        return [
            PredictionResult(example, output)
            for example, output in zip(batch, outputs, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}


def predict_in_fixed_batches(model: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """`model.predict_on_batch` over slices of exactly `batch_size` rows (the last padded)."""
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        padding = batch_size - len(chunk)
        if padding:
            chunk = np.concatenate([chunk, np.zeros((padding, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(model.predict_on_batch(chunk))[: batch_size - padding])
    return np.concatenate(outputs)


def grow_gpu_memory_on_demand() -> None:
    """TensorFlow takes all of a GPU's memory when it first touches it, so a second process
    on the same GPU (another SDK process of a Dataflow worker) would fail to load its model.
    Growing on demand lets processes share the GPU; it must be set before TensorFlow uses
    the device, which is why it runs here, before the model is built."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        # RuntimeError: the device is already in use, and its setting can no longer change.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
