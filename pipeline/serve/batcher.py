"""Micro-batching: images from concurrent requests, gathered into batches for the model.

The model computes 16 images in far less than 16 times one image's time, and a service's
requests arrive one by one. Each request's image waits in a queue; one task takes the
first waiting image, gathers more for at most `max_wait_s` (or up to `max_batch`), and
hands the batch to the model's own thread, off the event loop. While the model computes,
new images queue up for the next batch: the busier the service, the fuller its batches.

The queue is bounded by its places: an image takes one once its bytes are in hand (a
body that has arrived, a URL that has been fetched), at most `max_queue` at once, and is
refused at once past that (QueueFull), so the queue never grows with the load. What waits
on a client or a host (a body still arriving, a URL being fetched) takes no place here, so
that slow peers cannot keep others' images out. The places also tell the gatherer whether
waiting is worth it: when no image that holds one is still being decoded, a lone image
goes to the model at once instead of waiting for company that is not coming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np

# (images in the batch, seconds the model took): for the service's metrics.
BatchObserver = Callable[[int, float], None]


class QueueFull(Exception):
    """The service holds as much as it may: the caller should try again later."""


class Places:
    """A fixed number of places, each held for a block (`with places.hold(n): ...`), refused
    at once with QueueFull when too few are free: no one waits in line for one."""

    def __init__(self, limit: int, what: str):
        self.limit = limit
        self.what = what
        self.taken = 0

    @contextmanager
    def hold(self, n: int = 1) -> Iterator[None]:
        if self.taken + n > self.limit:
            raise QueueFull(f"{self.taken} of {self.limit} {self.what} are taken")
        self.taken += n
        try:
            yield
        finally:
            self.taken -= n


class MicroBatcher:
    """`with batcher.places.hold(): ... await batcher.predict(image)`, from many requests at
    once; `predict_batch` (stacked images -> one output each, in order: an array's rows, or
    a list) runs on one thread of its own."""

    def __init__(
        self,
        predict_batch: Callable[[np.ndarray], Sequence[Any]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        observe: BatchObserver | None = None,
    ):
        self._predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._observe = observe or (lambda size, seconds: None)
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.places = Places(max_queue, "places in the queue")
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Images queued for the model's next batches."""
        return self._queue.qsize()

    async def predict(self, image: np.ndarray) -> Any:
        """The model's output for one image, computed in a batch with others."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, future))
        return await future

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            future.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            await self._compute(batch)

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The first waiting image, and those that join it before the batch is full, the wait
        is over, or no image that holds a place is left to join."""
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.places.taken <= len(batch):
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _compute(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        """Runs the model on the batch's images; every request gets its row, or the error
        (cancelled, if the batcher is closed meanwhile)."""
        batch = [(image, future) for image, future in batch if not future.done()]  # gone
        if not batch:
            return
        images = np.stack([image for image, _ in batch])
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._model_thread, self._predict_batch, images)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._observe(len(batch), time.perf_counter() - started)
        for (_, future), output in zip(batch, outputs, strict=True):
            if not future.done():
                future.set_result(output)
        # The answered requests take their next step (and give back their places) before
        # the next batch is gathered, which would otherwise wait for them to join it.
        await asyncio.sleep(0)
