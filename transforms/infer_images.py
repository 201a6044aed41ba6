"""Images to model outputs: load, decode, batch and run, with every failure kept as a row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

from transforms.catalog import ImageRecord
from transforms.fetch import FetchPolicy
from transforms.load import LoadImages


class InferImages(beam.PTransform):
    """ImageRecords -> (successes, failures).

    successes: (record, PredictionResult); failures: (record, "kind: message"). Together
    they hold every input record exactly once.
    """

    def __init__(
        self,
        model: ModelHandler[np.ndarray, PredictionResult, Any],
        input_size: int,
        max_pixels: int,
        fetch: FetchPolicy,
    ):
        super().__init__()
        self._model: KeyedModelHandler[ImageRecord, np.ndarray, PredictionResult, Any]
        self._model = KeyedModelHandler(model)
        self._load = LoadImages(input_size, max_pixels, fetch)

    def expand(self, records: beam.PCollection[ImageRecord]):
        loaded = records | "LoadImages" >> self._load
        inferred, failed = (
            loaded.images | "RunInference" >> RunInference(self._model).with_exception_handling()
        )
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            _failed_batch_errors
        )
        failures = (loaded.errors, failed_batches) | "AllFailures" >> beam.Flatten()
        return inferred, failures


def _failed_batch_errors(failure: tuple) -> Iterator[tuple[ImageRecord, str]]:
    """RunInference's dead letters are (batch, exception): one error per record."""
    batch, exception = failure
    for record, _ in batch:
        yield record, f"inference_failed: {type(exception).__name__}: {exception}"
