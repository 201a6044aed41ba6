"""A RunInference ModelHandler for the models artstyle runs, in the shape Beam's own have.

Beam's TensorFlow handlers import tensorflow_hub and tf-keras; this one needs neither, nor
Keras itself: it runs whatever its loader returns that has `predict_on_batch` (a Keras model,
or models.openvino_engine's classifier). Every batch has the same shape (the last one is
padded), so a Keras model's compiled predict function is traced once and reused, and
OpenVINO's is compiled for that one shape. A model of several outputs (the probabilities
and the embeddings) gives each image a tuple of its outputs, in the model's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from models.fixed_batches import outputs_in_fixed_batches

METRICS_NAMESPACE = "artstyle"


class FixedBatchModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Runs a model over fixed-size batches of equally shaped numpy arrays.

    `load` builds the model; it runs once per worker (Beam shares the loaded model across
    the worker's threads), so it must be a picklable, module-level callable such as
    `functools.partial(load_classifier, path)`.
    """

    def __init__(self, load: Callable[[], Any], batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._load = load
        self._batch_size = batch_size

    def load_model(self) -> Any:
        return self._load()

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        outputs = outputs_in_fixed_batches(model, np.stack(batch), self._batch_size)
        per_image = outputs[0] if len(outputs) == 1 else list(zip(*outputs, strict=True))
        return [
            PredictionResult(example, output)
            for example, output in zip(batch, per_image, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}
