"""Fetching and decoding images inside the pipeline, with bad images routed aside."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.catalog import ImageRecord
from transforms.fetch import BackgroundFetcher, FetchPolicy
from transforms.images import DECODE_THREADS, DEFAULT_MAX_PIXELS, ImageError, decode_image
from transforms.model_handler import METRICS_NAMESPACE
from transforms.progress import IMAGES_DONE

ERRORS = "errors"

# At least two batches of the pipeline's default size in flight: the one the model will
# take next is decoded while it computes the current one.
DECODE_LOOKAHEAD = 64


class LoadImageFn(beam.DoFn):
    """ImageRecord -> (record, uint8 array) on the main output, or (record, error) on ERRORS.

    One unreadable image must never fail the run: every failure of this step becomes an
    error row downstream, and is counted by kind in Beam's metrics.

    Bytes are fetched on an event loop of the worker's own (many requests in flight: see
    transforms/fetch.py) and decoded on a small thread pool as they arrive, for up to
    `lookahead` records at a time. The model runs downstream in the same thread (Beam fuses
    the steps), so without this, fetching, decoding and inference would take turns; with it,
    the network's waits and the next batch's decoding overlap the model's work (Pillow and
    the engines release the GIL). Each image goes on as soon as it is decoded, in whatever
    order they finish: one that waits (a Retry-After, a slow host, its deadline) holds back
    no other, and the model is never idle while any image is ready.
    """

    def __init__(
        self,
        size: int,
        max_pixels: int,
        fetch: FetchPolicy,
        threads: int = DECODE_THREADS,
        lookahead: int | None = None,
    ):
        self._size = size
        self._max_pixels = max_pixels
        self._fetch = fetch
        # Enough records ahead to keep every fetch slot busy, and two batches decoded.
        self._lookahead = lookahead or max(DECODE_LOOKAHEAD, 2 * fetch.concurrency)
        self._threads = threads
        self._loaded = Metrics.counter(METRICS_NAMESPACE, "images_loaded")

    def setup(self) -> None:
        self._fetcher = BackgroundFetcher(self._fetch)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self) -> None:
        self._pending: dict[Future, tuple[ImageRecord, Any, Any]] = {}

    def process(
        self, record: ImageRecord, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam
    ) -> Iterator:
        """Starts the record's load, and passes on every load that has finished: waits only
        while `lookahead` are unfinished."""
        self._pending[self._load(record)] = (record, timestamp, window)
        finished = [loaded for loaded in self._pending if loaded.done()]
        if len(self._pending) - len(finished) >= self._lookahead:
            finished = list(wait(self._pending, return_when=FIRST_COMPLETED).done)
        for loaded in finished:
            record, _, _ = self._pending.pop(loaded)
            yield from self._outputs(record, loaded)

    def finish_bundle(self) -> Iterator:
        """What is still pending, as it finishes, with the timestamp and window each record
        came with (the only outputs Beam accepts from finish_bundle)."""
        while self._pending:
            for loaded in wait(self._pending, return_when=FIRST_COMPLETED).done:
                record, timestamp, window = self._pending.pop(loaded)
                for output in self._outputs(record, loaded):
                    if isinstance(output, beam.pvalue.TaggedOutput):
                        value = WindowedValue(output.value, timestamp, (window,))
                        yield beam.pvalue.TaggedOutput(output.tag, value)
                    else:
                        yield WindowedValue(output, timestamp, (window,))

    def teardown(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._fetcher.close()

    def _load(self, record: ImageRecord) -> Future[np.ndarray]:
        """The decoded image, once fetched and decoded; a catalog row that could not be read
        fails at once with its own error."""
        loaded: Future[np.ndarray] = Future()
        if record.error:
            kind, _, message = record.error.partition(": ")
            loaded.set_exception(ImageError(kind, message))
            return loaded
        fetched = self._fetcher.submit(record.location)
        fetched.add_done_callback(lambda done: self._decode_when_fetched(done, loaded))
        return loaded

    def _decode_when_fetched(self, fetched: Future[bytes], loaded: Future[np.ndarray]) -> None:
        if error := fetched.exception():
            loaded.set_exception(error)
            return
        decoding = self._pool.submit(
            decode_image, fetched.result(), size=self._size, max_pixels=self._max_pixels
        )
        decoding.add_done_callback(lambda done: _copy_outcome(done, loaded))

    def _outputs(self, record: ImageRecord, loaded: Future) -> Iterator:
        IMAGES_DONE.add()
        try:
            image = loaded.result()
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


def _copy_outcome(source: Future, target: Future) -> None:
    if error := source.exception():
        target.set_exception(error)
    else:
        target.set_result(source.result())


class LoadImages(beam.PTransform):
    """Returns a DoOutputsTuple: `.images` of (record, array) and `.errors` of (record, str)."""

    def __init__(
        self,
        size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fetch: FetchPolicy | None = None,
        threads: int = DECODE_THREADS,
        lookahead: int | None = None,
    ):
        super().__init__()
        self._fn = LoadImageFn(size, max_pixels, fetch or FetchPolicy(), threads, lookahead)

    def expand(self, records: beam.PCollection[ImageRecord]):
        return records | beam.ParDo(self._fn).with_outputs(ERRORS, main="images")
