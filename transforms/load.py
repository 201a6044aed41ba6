"""Fetching and decoding images inside the pipeline, with bad images routed aside."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.catalog import ImageRecord
from transforms.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    read_bytes,
)
from transforms.inference import METRICS_NAMESPACE

ERRORS = "errors"


class LoadImageFn(beam.DoFn):
    """ImageRecord -> (record, uint8 array) on the main output, or (record, error) on ERRORS.

    One unreadable image must never fail the run: every failure of this step becomes an
    error row downstream, and is counted by kind in Beam's metrics.
    """

    def __init__(self, size: int, max_bytes: int, max_pixels: int):
        self._size = size
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._loaded = Metrics.counter(METRICS_NAMESPACE, "images_loaded")

    def process(self, record: ImageRecord) -> Iterator:
        try:
            yield record, self._load(record.location)
            self._loaded.inc()
        except ImageError as error:
            Metrics.counter(METRICS_NAMESPACE, f"errors_{error.kind}").inc()
            yield beam.pvalue.TaggedOutput(ERRORS, (record, str(error)))
        except Exception as error:  # a bug or a library surprise: still one row, not a crash
            Metrics.counter(METRICS_NAMESPACE, "errors_internal").inc()
            message = f"internal: {type(error).__name__}: {error}"
            yield beam.pvalue.TaggedOutput(ERRORS, (record, message))

    def _load(self, location: str) -> np.ndarray:
        if not location:
            raise ImageError("missing_uri", "the row has no image URI")
        data = read_bytes(location, max_bytes=self._max_bytes)
        return decode_image(data, size=self._size, max_pixels=self._max_pixels)


class LoadImages(beam.PTransform):
    """Returns a DoOutputsTuple: `.images` of (record, array) and `.errors` of (record, str)."""

    def __init__(
        self,
        size: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        self._fn = LoadImageFn(size, max_bytes, max_pixels)

    def expand(self, records: beam.PCollection[ImageRecord]):
        return records | beam.ParDo(self._fn).with_outputs(ERRORS, main="images")
