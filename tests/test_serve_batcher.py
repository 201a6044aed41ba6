"""The micro-batcher on its own: a fake model that records its batches, on one event loop.

Each test decides which images are in the queue, and which places are held, before the
batcher looks: the batches it makes then follow from its rules alone, not from timing.
Requests hold their places as the service's do, from before their image is queued until
their answer. Where a test must know that the model has started a batch, the model says
so (an Event).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from pipeline.serve.batcher import MicroBatcher, Places, QueueFull

FOREVER_S = 3600.0  # a wait no test sits through: a batch that waited for it would hang
HANG_GUARD_S = 30.0  # fails a test that hangs, instead of hanging the suite


class FakeModel:
    """Each image is a (1,) array holding its number, and its output row is that number
    times ten: every request can tell its own row from another's. Records each batch."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[int]] = []
        self.fail = fail
        self.started = threading.Event()  # set as a batch begins
        self.release = threading.Event()  # a batch ends once this is set
        self.release.set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append([int(image[0]) for image in images])
        self.started.set()
        self.release.wait(HANG_GUARD_S)
        if self.fail:
            raise RuntimeError("the model broke")
        return images * 10


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(HANG_GUARD_S):
            await test()

    asyncio.run(guarded())


def batcher_for(model: FakeModel, **settings: Any) -> MicroBatcher:
    return MicroBatcher(
        model, **{"max_batch": 8, "max_wait_s": FOREVER_S, "max_queue": 16, **settings}
    )


async def requests(batcher: MicroBatcher, *numbers: int) -> list[asyncio.Task]:
    """Requests for these images, each holding its place; all are queued when this returns
    (a new task takes its first step, up to its wait for the answer, at the next yield)."""

    async def request(number: int) -> int:
        with batcher.places.hold():
            return int((await batcher.predict(np.array([number])))[0])

    tasks = [asyncio.create_task(request(number)) for number in numbers]
    await asyncio.sleep(0)
    return tasks


async def in_thread(wait: Callable[[], Any]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, wait)


def test_images_waiting_together_go_as_one_batch_and_each_gets_its_own_row():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model)
        tasks = await requests(batcher, 1, 2, 3)
        batcher.start()
        assert await asyncio.gather(*tasks) == [10, 20, 30]
        await batcher.close()

    run(test)
    assert model.batches == [[1, 2, 3]]


def test_a_batch_holds_at_most_max_batch_images_and_answered_ones_wait_for_nothing():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model, max_batch=2)
        tasks = await requests(batcher, 1, 2, 3, 4, 5)
        batcher.start()
        # 5 goes alone at once: 3 and 4, answered, no longer hold their places.
        assert await asyncio.gather(*tasks) == [10, 20, 30, 40, 50]
        await batcher.close()

    run(test)
    assert model.batches == [[1, 2], [3, 4], [5]]


def test_a_lone_image_goes_at_once_when_no_other_holds_a_place():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model)  # it would wait an hour for company
        batcher.start()
        assert await asyncio.gather(*await requests(batcher, 7)) == [70]
        await batcher.close()

    run(test)
    assert model.batches == [[7]]


def test_an_image_waits_for_one_that_holds_a_place_and_is_still_being_decoded():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model)
        batcher.start()
        with batcher.places.hold():  # an image being decoded
            first = await requests(batcher, 1)
            while batcher.waiting:  # the batcher has taken 1, and waits for the other
                await asyncio.sleep(0)
            for _ in range(10):
                await asyncio.sleep(0)
            assert model.batches == []
            second = await requests(batcher, 2)
        assert await asyncio.gather(*first, *second) == [10, 20]
        await batcher.close()

    run(test)
    assert model.batches == [[1, 2]]


def test_past_max_wait_a_batch_goes_without_the_image_still_being_decoded():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model, max_wait_s=0.01)
        batcher.start()
        with batcher.places.hold():  # an image that never comes
            assert await asyncio.gather(*await requests(batcher, 1)) == [10]
        await batcher.close()

    run(test)
    assert model.batches == [[1]]


def test_images_that_arrive_while_the_model_computes_make_the_next_batch():
    model = FakeModel()
    model.release.clear()

    async def test() -> None:
        batcher = batcher_for(model)
        batcher.start()
        first = await requests(batcher, 1)
        await in_thread(model.started.wait)
        later = await requests(batcher, 2, 3, 4)
        model.release.set()
        assert await asyncio.gather(*first, *later) == [10, 20, 30, 40]
        await batcher.close()

    run(test)
    assert model.batches == [[1], [2, 3, 4]]


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_runs():
    model = FakeModel(fail=True)

    async def test() -> None:
        batcher = batcher_for(model)
        tasks = await requests(batcher, 1, 2)
        batcher.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [str(result) for result in results] == ["the model broke"] * 2
        model.fail = False
        assert await asyncio.gather(*await requests(batcher, 3)) == [30]
        await batcher.close()

    run(test)
    assert model.batches == [[1, 2], [3]]


def test_a_request_gone_before_its_batch_is_left_out_of_it():
    model = FakeModel()

    async def test() -> None:
        batcher = batcher_for(model)
        tasks = await requests(batcher, 1, 2, 3)
        tasks[1].cancel()  # its client hung up
        await asyncio.sleep(0)  # and its place is given back
        batcher.start()
        assert await asyncio.gather(tasks[0], tasks[2]) == [10, 30]
        await batcher.close()

    run(test)
    assert model.batches == [[1, 3]]


def test_each_batch_is_observed_with_its_size_and_the_models_time():
    model, observed = FakeModel(), []

    async def test() -> None:
        batcher = batcher_for(model, observe=lambda size, seconds: observed.append((size, seconds)))
        tasks = await requests(batcher, 1, 2)
        batcher.start()
        await asyncio.gather(*tasks)
        await batcher.close()

    run(test)
    assert [size for size, _ in observed] == [2]
    assert observed[0][1] >= 0


def test_closing_cancels_every_request_without_its_answer():
    model = FakeModel()
    model.release.clear()

    async def test() -> None:
        batcher = batcher_for(model, max_batch=1)
        tasks = await requests(batcher, 1, 2)
        batcher.start()
        await in_thread(model.started.wait)  # 1 is in the model, 2 waits in the queue
        await batcher.close()
        model.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(result) for result in results] == [asyncio.CancelledError] * 2

    run(test)
    assert model.batches == [[1]]


def test_places_are_refused_at_once_past_the_limit_and_freed_with_their_block():
    places = Places(3, "places in the queue")
    with places.hold(2):
        with pytest.raises(QueueFull, match="2 of 3 places in the queue are taken"), places.hold(2):
            pass
        assert places.taken == 2
        with places.hold():
            assert places.taken == 3
    assert places.taken == 0
    with pytest.raises(RuntimeError), places.hold(3):
        raise RuntimeError("the block failed")
    assert places.taken == 0  # freed however the block ends
