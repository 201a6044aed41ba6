"""The style service's working parts: the bundle's model, loaded once and warmed up; the
fetcher behind the guard; decoding off the event loop; the micro-batcher; and the answer
for one image, with the fields of the batch pipeline's rows.

The same image gets the same probabilities as in the pipeline: the same decoding
(transforms/images.py), the same model on the same engine, chosen and loaded by the same
code (models/engine_choice.py, models/openvino_engine.py, models/bundle.py), in the same
arithmetic, and the same way to run it (`predict_in_fixed_batches`). A batch is padded to
one of a few fixed shapes, each run once during the warm-up, so that a lone request does
not pay for a batch of 32 and no request pays for a trace: on Keras 1, 2, 4, ... up to
--max_batch (a graph traced per shape, over one copy of the weights); on OpenVINO 1 and
OPENVINO_CALL, a larger batch in several calls (a model compiled per shape holds a copy of
the weights of its own). OPENVINO_CALL is the fewest images that OpenVINO's CPU plugin
spreads over two cores: it runs smaller batches on one.

With --index the model is the classifier with embeddings, on either engine: each image's
probabilities and its embedding from one pass, so that a request for similar paintings
(similar.py) costs its prediction and a search.

A heatmap, where asked for, is the explanations' Grad-CAM (models/gradcam.py) for the top
style, over the model-sized square the model saw, on a thread of its own: it is one
image's gradient, not batched. Gradients need Keras: on the Keras engine Grad-CAM loads
with the model, before the service is ready; on OpenVINO, whose process otherwise never
imports TensorFlow, at the first heatmap asked for, which waits for it (and so does any
other asked for meanwhile).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from models.bundle import ModelBundle, load_classifier
from models.engine_choice import EngineChoice, choose_engine
from models.fixed_batches import Classifier, outputs_in_fixed_batches
from models.openvino_engine import load_openvino_classifier, openvino_precision_of
from models.precision import PrecisionChoice, choose_precision
from pipeline.serve.batcher import MicroBatcher, Places, QueueFull
from pipeline.serve.bodies import BodyBudget
from pipeline.serve.config import ServeConfig
from pipeline.serve.errors import (
    IMAGE_FAULT_STATUS,
    INDEX_IMAGE_FAULT_STATUS,
    ServiceError,
    overloaded,
)
from pipeline.serve.guard import check_index_uri, check_url, guarded_socket
from pipeline.serve.metrics import ServiceMetrics
from pipeline.serve.similar import THUMBNAIL_SIDE, NeighbourQuery, SimilarPaintings
from transforms.fetch import Fetcher, FetchPolicy, default_user_agent
from transforms.images import DECODE_THREADS, ImageError, brief, decode_image, jpeg
from transforms.top_k import top_k_fields

if TYPE_CHECKING:
    from models.gradcam import GradCam
    from models.vector_index import VectorIndex

logger = logging.getLogger("artstyle.serve")

# The fetcher's own deadline is this much later than the service's, so that the service's
# fires first and a slow URL is told apart (504) from an unreachable one (502).
FETCHER_DEADLINE_GRACE_S = 1.0
# A service's client waits: one retry of a transient fault, not the pipeline's three.
FETCH_RETRIES = 1
# What a client is told to wait before trying again while the model is loading.
LOADING_RETRY_AFTER_S = 5
# The images of an OpenVINO call, beside single images: see the module's docstring.
OPENVINO_CALL = 8


class ModelState(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ImageOutput:
    """The model's output for one image: its probabilities, and its embedding where the
    classifier gives one (with --index)."""

    probabilities: np.ndarray
    embedding: np.ndarray | None = None


def batch_shapes(max_batch: int, engine: str) -> tuple[int, ...]:
    """The sizes of the model's calls. Keras: 1, 2, 4, ... below `max_batch`, and
    `max_batch`. OpenVINO: 1 and OPENVINO_CALL (at most `max_batch`)."""
    if engine == "openvino":
        return tuple(sorted({1, min(OPENVINO_CALL, max_batch)}))
    shapes = [1]
    while shapes[-1] * 2 < max_batch:
        shapes.append(shapes[-1] * 2)
    return (*shapes, max_batch) if max_batch > 1 else (1,)


def call_sizes(n: int, shapes: tuple[int, ...]) -> list[int]:
    """The shapes that a batch of `n` images runs as: the largest while more images than it
    remain, then the smallest that holds the rest (padded to it)."""
    sizes = []
    while n > shapes[-1]:
        sizes.append(shapes[-1])
        n -= shapes[-1]
    return [*sizes, next(shape for shape in shapes if shape >= n)]


def service_precision(
    bundle: ModelBundle,
    engine: str,
    asked: str,
    shapes: tuple[int, ...],
    embeddings: bool = False,
):
    """--precision on `engine`, with 'auto' resolved as the pipeline resolves it for workers
    on its own machine (the same rule, and the same measurement, cached per machine)."""
    if engine == "openvino":
        return openvino_precision_of(bundle.path, None, asked, max(shapes), embeddings)
    return choose_precision(
        asked, partial(bundle.classifier, None, embeddings=embeddings), bundle.id
    )


def load_classifiers(
    bundle: ModelBundle,
    engine: str,
    precision: str,
    shapes: tuple[int, ...],
    embeddings: bool = False,
) -> dict[int, Classifier]:
    """What runs each of the batch shapes, in `precision` ('float32' or 'bfloat16'): one
    Keras model for all of them, or an OpenVINO model compiled for each; with `embeddings`,
    the classifier that gives each image's embedding too."""
    if engine == "openvino":
        return {shape: load_openvino_classifier(bundle.path, None, precision, shape, embeddings)
                for shape in shapes}  # fmt: skip
    return dict.fromkeys(shapes, load_classifier(bundle.path, None, precision, embeddings))


def bundle_grad_cam(bundle: ModelBundle) -> GradCam:
    """The explanations' Grad-CAM for the bundle (TensorFlow loads with it)."""
    from models.gradcam import bundle_grad_cam

    return bundle_grad_cam(bundle)


class StyleService:
    """`await start()` returns at once; the model loads in the background, and `state` says
    when it is READY (loaded, and every batch shape run once; on Keras, Grad-CAM too,
    unless --no_heatmaps). `load_model` (one model for every batch shape; with an index,
    one that gives embeddings) and `load_grad_cam` replace the bundle's loaders. `index`:
    the --index, checked against the bundle (pipeline.similar.open_index)."""

    def __init__(
        self,
        config: ServeConfig,
        bundle: ModelBundle,
        load_model: Callable[[], Classifier] | None = None,
        load_grad_cam: Callable[[], GradCam] | None = None,
        index: VectorIndex | None = None,
    ):
        self.config = config
        self.bundle = bundle
        self.similar = SimilarPaintings(index) if index is not None else None
        self.state = ModelState.LOADING
        self.engine: EngineChoice = choose_engine(config.engine, on_this_machine=True)
        self.precision: PrecisionChoice | None = None  # resolved as the model loads
        self._shapes = batch_shapes(config.max_batch, self.engine.engine)
        self._load_model = load_model
        self._load_grad_cam = load_grad_cam or partial(bundle_grad_cam, bundle)
        self._models: dict[int, Classifier] = {}
        self._grad_cam: asyncio.Task[GradCam] | None = None  # once its loading has begun
        self._told_grad_cam_failed = False
        self.batcher = MicroBatcher(
            self._predict_batch,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_s,
            max_queue=config.max_queue,
            observe=lambda size, seconds: self.metrics.observe_batch(size, seconds),
        )
        self.bodies = BodyBudget(config.max_body_bytes_held)
        self.fetches = Places(config.max_queue, "places for URLs being fetched")
        self.metrics = ServiceMetrics(
            waiting=lambda: self.batcher.waiting,
            in_queue=lambda: self.batcher.places.taken,
            fetching=lambda: self.fetches.taken,
            body_bytes=lambda: self.bodies.held,
        )
        self._decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
        self._explainer = ThreadPoolExecutor(1, thread_name_prefix="grad-cam")
        self._resources = AsyncExitStack()
        self._fetcher: Fetcher | None = None
        self._loading: asyncio.Task | None = None

    # --- Life ------------------------------------------------------------------------------

    async def start(self) -> None:
        policy = FetchPolicy(
            concurrency=self.config.max_queue,
            max_retries=FETCH_RETRIES,
            timeout_s=self.config.fetch_timeout_s + FETCHER_DEADLINE_GRACE_S,
            max_bytes=self.config.max_image_bytes,
            user_agent=default_user_agent(),
        )
        guard = None if self.config.allow_private_urls else guarded_socket
        self._fetcher = await self._resources.enter_async_context(Fetcher(policy, guard))
        self.batcher.start()
        self._resources.push_async_callback(self.batcher.close)
        self._loading = asyncio.create_task(self._load(), name="load-model")

    async def stop(self) -> None:
        for task in (self._loading, self._grad_cam):
            if task is not None:
                task.cancel()
        await self._resources.aclose()
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._explainer.shutdown(wait=False, cancel_futures=True)
        if self.similar is not None:
            self.similar.close()

    async def _load(self) -> None:
        logger.info("artstyle: %s", self.engine)
        try:
            models = await asyncio.to_thread(self._loaded_models)
            await asyncio.to_thread(self._warm_up, models)
            if self.config.heatmaps and self.engine.engine == "keras":
                await self._grad_cam_loading()
        except Exception:
            logger.exception("artstyle: the model %s could not be loaded", self.bundle.path)
            self.state = ModelState.FAILED
            return
        self._models = models
        self.state = ModelState.READY
        similar = f", similar paintings from {self.similar.index.size:,}" if self.similar else ""
        logger.info("artstyle: %s is ready (batch shapes %s%s)", self.bundle.id, self._shapes,
                    similar)  # fmt: skip

    def _loaded_models(self) -> dict[int, Classifier]:
        if self._load_model is not None:
            return dict.fromkeys(self._shapes, self._load_model())
        engine, embeddings = self.engine.engine, self.similar is not None
        choice = service_precision(self.bundle, engine, self.config.precision, self._shapes,
                                   embeddings)  # fmt: skip
        logger.info("artstyle: %s (--precision=%s)", choice, self.config.precision)
        self.precision = choice
        return load_classifiers(self.bundle, engine, choice.precision, self._shapes, embeddings)

    def _warm_up(self, models: dict[int, Classifier]) -> None:
        """Every batch shape once, so that no request waits for TensorFlow to trace one (or
        for OpenVINO's first run of a shape)."""
        for shape, model in models.items():
            outputs_in_fixed_batches(model, self._blank(shape), shape)

    def _blank(self, n: int) -> np.ndarray:
        size = self.bundle.input_size
        return np.zeros((n, size, size, 3), np.uint8)

    def _predict_batch(self, images: np.ndarray) -> list[ImageOutput]:
        """On the batcher's model thread: each image's output."""
        calls, start = [], 0
        for size in call_sizes(len(images), self._shapes):
            chunk = images[start : start + size]
            calls.append(outputs_in_fixed_batches(self._models[size], chunk, size))
            start += size
        outputs = [np.concatenate(parts) for parts in zip(*calls, strict=True)]
        return [ImageOutput(*rows) for rows in zip(*outputs, strict=True)]

    def _grad_cam_loading(self) -> asyncio.Task[GradCam]:
        """Grad-CAM, loaded and run once on the explainer's thread: begun by the first
        caller, and the same task for every caller after it."""
        if self._grad_cam is None:
            self._grad_cam = asyncio.create_task(self._load_grad_cam_now(), name="load-grad-cam")
        return self._grad_cam

    async def _load_grad_cam_now(self) -> GradCam:
        loop = asyncio.get_running_loop()
        grad_cam = await loop.run_in_executor(self._explainer, self._load_grad_cam)
        await loop.run_in_executor(self._explainer, self._explain, grad_cam, self._blank(1)[0], 0)
        logger.info("artstyle: Grad-CAM is loaded, for heatmaps")
        return grad_cam

    # --- Answers ---------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.state is ModelState.READY:
            return
        if self.state is ModelState.FAILED:
            raise ServiceError(503, "model_failed", "the model could not be loaded; see the log")
        raise ServiceError(
            503, "not_ready", "the model is still loading", retry_after_s=LOADING_RETRY_AFTER_S
        )

    @contextmanager
    def fetching(self, urls: int = 1) -> Iterator[None]:
        """A place for each URL while it is fetched and answered (its bytes are in memory
        until then), or 503 with Retry-After. URLs whose hosts are slow fill these places,
        not the queue's, so they cannot keep uploads out."""
        with self._holding(self.fetches, urls):
            yield

    @contextmanager
    def _holding(self, places: Places, n: int) -> Iterator[None]:
        self.check_ready()
        try:
            with places.hold(n):
                yield
        except QueueFull as error:
            raise overloaded(str(error)) from None

    async def predict_image(
        self,
        data: bytes,
        url: str | None = None,
        heatmap: bool = False,
        similar: NeighbourQuery | None = None,
    ) -> dict[str, Any]:
        """The answer for one image's bytes, with the heatmap if asked for (and served) and
        its neighbours in the index if `similar`, computed in a place in the queue (503 with
        Retry-After when none is free); ServiceError if the bytes are not a usable image."""
        if not data:
            raise ServiceError(422, "empty", "the image is empty (0 bytes)")
        with self._holding(self.batcher.places, 1):
            image = await self._decode(data, self.bundle.input_size)
            output: ImageOutput = await self.batcher.predict(image)
            answer = self.answer(output.probabilities, url)
            if similar is not None:
                answer["neighbours"] = await self._neighbours(output, similar)
            if heatmap and self.config.heatmaps:
                shown = await self.heatmap(image, int(np.argmax(output.probabilities)))
                answer |= {"heatmap": shown} if shown is not None else {}
        return answer

    async def _decode(
        self, data: bytes, size: int, fault_status: int = IMAGE_FAULT_STATUS
    ) -> np.ndarray:
        """The image's centred square, `size` pixels a side, decoded on a decoding thread."""
        decode = partial(decode_image, data, size=size, max_pixels=self.config.max_image_pixels)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, decode)
        except ImageError as error:
            raise ServiceError.of_image(error, fault_status) from None

    async def predict_url(
        self, url: str, heatmap: bool = False, similar: NeighbourQuery | None = None
    ) -> dict[str, Any]:
        """The answer for the image at `url`; the caller holds its place (`fetching`)."""
        return await self.predict_image(await self.fetch(url), url, heatmap, similar)

    def check_index(self) -> SimilarPaintings:
        """The service's index, or 404 no_index for a service started without one."""
        if self.similar is None:
            message = "the service was started without --index: it has no similar paintings"
            raise ServiceError(404, "no_index", message)
        return self.similar

    async def _neighbours(self, output: ImageOutput, query: NeighbourQuery) -> list[dict]:
        similar = self.check_index()
        if output.embedding is None:  # an index always comes with the embeddings' classifier
            raise RuntimeError("the model gave no embedding for a similarity query")
        return await similar.nearest(output.embedding, query)

    async def thumbnail(self, item_id: int) -> bytes:
        """A small JPEG of the image the index names for `item_id`, from the cache or read,
        in a place for URLs, as guard.py's `check_index_uri` allows: 404 for an id the
        index does not have, 502 (403, 504) for an image that cannot be read or used."""
        similar = self.check_index()
        uri = similar.uri_of(item_id)
        cached = similar.thumbnails.get(item_id)
        if cached is not None:
            return cached
        with self.fetching():
            data = await self._read(uri, check_index_uri, INDEX_IMAGE_FAULT_STATUS)
            square = await self._decode(data, THUMBNAIL_SIDE, INDEX_IMAGE_FAULT_STATUS)
            thumbnail = await asyncio.get_running_loop().run_in_executor(
                self._decoders, jpeg, square
            )
        similar.thumbnails.put(item_id, thumbnail)
        return thumbnail

    async def heatmap(self, image: np.ndarray, style: int) -> str | None:
        """Grad-CAM for `style` over the image, as a JPEG data URL the page can show as is;
        None where Grad-CAM could not be loaded (the log says why, once)."""
        loading = self._grad_cam_loading()
        try:
            grad_cam = await asyncio.shield(loading)  # a client that hangs up stops no load
        except Exception:
            if not self._told_grad_cam_failed:
                self._told_grad_cam_failed = True
                logger.error("artstyle: Grad-CAM could not be loaded: answers go without "
                             "heatmaps", exc_info=loading.exception())  # fmt: skip
            return None
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._explainer, self._explain, grad_cam, image, style)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg(pixels)).decode("ascii")

    @staticmethod
    def _explain(grad_cam: GradCam, image: np.ndarray, style: int) -> np.ndarray:
        from models.gradcam import overlay  # loaded with Grad-CAM

        explanation = grad_cam(image[np.newaxis], np.array([style]))
        return overlay(image, explanation.heatmaps[0])

    async def fetch(self, url: str) -> bytes:
        """The bytes at an http(s) URL a request names, through the guard, within
        --fetch_timeout_s."""
        return await self._read(url, check_url, IMAGE_FAULT_STATUS)

    async def _read(self, uri: str, check: Callable[[str], None], fault_status: int) -> bytes:
        """The bytes at `uri` if `check` allows it (the fetcher's connections go through the
        guard), within --fetch_timeout_s; `fault_status` for an error that is the image's."""
        assert self._fetcher is not None, "start() the service first"
        try:
            check(uri)
            async with asyncio.timeout(self.config.fetch_timeout_s):
                return await self._fetcher.fetch(uri)
        except ImageError as error:
            raise ServiceError.of_image(error, fault_status) from None
        except TimeoutError:
            message = f"{brief(uri)} did not answer within {self.config.fetch_timeout_s:g} s"
            raise ServiceError(504, "timed_out", message) from None

    def answer(self, probabilities: np.ndarray, url: str | None = None) -> dict[str, Any]:
        """The batch rows' fields, `predict` (the top style, as the original demo answered)
        and the URL when one was given."""
        fields = top_k_fields(probabilities, classes=self.bundle.classes, top_k=self.config.top_k)
        answer = {**fields, "model": self.bundle.id, "predict": fields["style"]}
        return answer | ({"url": url} if url is not None else {})
