"""Running a classifier over batches of one fixed size: the one way the pipeline's handler,
the service and the benchmarks call a model. Imports neither Keras nor Beam."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Classifier(Protocol):
    """What runs a batch of images: a Keras model, or models.openvino_engine's classifier."""

    def predict_on_batch(self, images: np.ndarray) -> Any: ...


def predict_in_fixed_batches(model: Classifier, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """The output of a model of one output (the probabilities), as `outputs_in_fixed_batches`."""
    (output,) = outputs_in_fixed_batches(model, inputs, batch_size)
    return output


def outputs_in_fixed_batches(
    model: Classifier, inputs: np.ndarray, batch_size: int
) -> tuple[np.ndarray, ...]:
    """`model.predict_on_batch` over slices of exactly `batch_size` rows (the last padded),
    each of its outputs for all rows (one, or those of the list it gives): a Keras model's
    compiled function is traced once per size, and OpenVINO's is compiled for one."""
    chunks = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        padding = batch_size - len(chunk)
        if padding:
            chunk = np.concatenate([chunk, np.zeros((padding, *chunk.shape[1:]), chunk.dtype)])
        outputs = model.predict_on_batch(chunk)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        chunks.append([np.asarray(output)[: batch_size - padding] for output in outputs])
    return tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True))
