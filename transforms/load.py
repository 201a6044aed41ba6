"""Fetching and decoding images inside the pipeline, with bad images routed aside."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

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

# Two batches of the pipeline's default size in flight: the one the model will take next
# is decoded while it computes the current one. Two threads: decoding is a small share.
DECODE_LOOKAHEAD = 64
DECODE_THREADS = 2


class LoadImageFn(beam.DoFn):
    """ImageRecord -> (record, uint8 array) on the main output, or (record, error) on ERRORS.

    One unreadable image must never fail the run: every failure of this step becomes an
    error row downstream, and is counted by kind in Beam's metrics.

    Images are fetched and decoded on a small thread pool, up to `lookahead` records ahead
    of what this step has emitted, and emitted in input order. The model runs downstream in
    the same thread (Beam fuses the steps), so without this, decoding and inference take
    turns; with it, the next batch is decoded while the model computes the current one
    (Pillow and TensorFlow both release the GIL while they work).
    """

    def __init__(
        self,
        size: int,
        max_bytes: int,
        max_pixels: int,
        lookahead: int = DECODE_LOOKAHEAD,
        threads: int = DECODE_THREADS,
    ):
        self._size = size
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._lookahead = lookahead
        self._threads = threads
        self._loaded = Metrics.counter(METRICS_NAMESPACE, "images_loaded")

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self) -> None:
        self._pending: deque[tuple[ImageRecord, Future, Any, Any]] = deque()

    def process(
        self, record: ImageRecord, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam
    ) -> Iterator:
        future = self._pool.submit(self._load, record.location)
        self._pending.append((record, future, timestamp, window))
        while len(self._pending) > self._lookahead:
            oldest, decoded, _, _ = self._pending.popleft()
            yield from self._outputs(oldest, decoded)

    def finish_bundle(self) -> Iterator:
        """What is still pending, with the timestamp and window each record came with (the
        only outputs Beam accepts from finish_bundle)."""
        while self._pending:
            record, future, timestamp, window = self._pending.popleft()
            for output in self._outputs(record, future):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    value = WindowedValue(output.value, timestamp, [window])
                    yield beam.pvalue.TaggedOutput(output.tag, value)
                else:
                    yield WindowedValue(output, timestamp, [window])

    def teardown(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def _outputs(self, record: ImageRecord, future: Future) -> Iterator:
        try:
            image = future.result()
        except ImageError as error:
            Metrics.counter(METRICS_NAMESPACE, f"errors_{error.kind}").inc()
            yield beam.pvalue.TaggedOutput(ERRORS, (record, str(error)))
        except Exception as error:  # a bug or a library surprise: still one row, not a crash
            Metrics.counter(METRICS_NAMESPACE, "errors_internal").inc()
            message = f"internal: {type(error).__name__}: {error}"
            yield beam.pvalue.TaggedOutput(ERRORS, (record, message))
        else:
            self._loaded.inc()
            yield record, image

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
        lookahead: int = DECODE_LOOKAHEAD,
        threads: int = DECODE_THREADS,
    ):
        super().__init__()
        self._fn = LoadImageFn(size, max_bytes, max_pixels, lookahead, threads)

    def expand(self, records: beam.PCollection[ImageRecord]):
        return records | beam.ParDo(self._fn).with_outputs(ERRORS, main="images")
