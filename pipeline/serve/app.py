"""The HTTP interface: routes, their schemas, and the app that ties the parts together.

POST /predict          one image: a JSON {"url": ...}, a multipart upload, or image/*
POST /predict/batch    {"urls": [...]}: one result per URL, in order, errors in place
POST /similar          one image, as /predict takes it: its answer and the index's nearest
                       paintings (with --index; 404 without)
GET  /similar/index    what the index holds (null without one: the page asks, and shows
                       similar paintings only where there are some)
GET  /similar/items/{item_id}/thumbnail   a small JPEG of an item of the index
GET  /health/live      the process answers
GET  /health/ready     the model is loaded and warmed up (503 until then)
GET  /model            the bundle's manifest
GET  /metrics          Prometheus
GET  /                 a page for people (static/), that works offline
GET  /docs, /redoc, /openapi.json (the docs' scripts are served here too: no CDN)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from models.bundle import ModelBundle
from pipeline.serve.bodies import UPLOAD_FIELD, RequestBodies, UrlRequest, read_image_source
from pipeline.serve.config import ServeConfig
from pipeline.serve.errors import ErrorBody, ServiceError, install_error_handlers, internal_error
from pipeline.serve.metrics import RequestMetrics
from pipeline.serve.service import Classifier, ModelState, StyleService
from pipeline.serve.similar import DEFAULT_K, MAX_K, THUMBNAIL_ROUTE, NeighbourQuery
from transforms.images import ACCEPTED_FORMATS

if TYPE_CHECKING:
    from models.gradcam import GradCam
    from models.vector_index import VectorIndex

logger = logging.getLogger("artstyle.serve")

STATIC = Path(__file__).parent / "static"

# A batch request holds a place for each of its URLs at once (or is refused whole, 503).
MAX_BATCH_URLS = 32


def _is_none(value: object) -> bool:
    return value is None


class Prediction(BaseModel):
    style: str = Field(description="The most likely style.")
    confidence: float = Field(description="Its probability.")
    top_k_styles: list[str]
    top_k_probabilities: list[float]
    model: str = Field(description="The model bundle's id.")
    predict: str = Field(description="The top style again, as the original demo answered.")
    url: str | None = Field(
        None, description="The URL asked about, when one was.", exclude_if=_is_none
    )
    heatmap: str | None = Field(
        None,
        description="With ?heatmap=true: where the evidence for the top style lies (Grad-CAM) "
        "over the square the model saw, as a JPEG data URL.",
        exclude_if=_is_none,
    )


class Neighbour(BaseModel):
    rank: int = Field(description="1 for the nearest.")
    distance: float = Field(description="Cosine distance of style: 0 the same, 1 unrelated.")
    same_picture: bool = Field(
        description="The same picture, however scanned, cropped or re-encoded: its "
        "fingerprint matches (such neighbours come first)."
    )
    id: int = Field(description="The item's id in the index.")
    uri: str | None = Field(description="The image as the index names it.")
    title: str | None
    style: str | None = Field(description="The style predicted for it when it was indexed.")
    confidence: float | None
    label: str | None = Field(description="Its catalog's label, where it had one.")
    thumbnail: str = Field(description="Its thumbnail's path on this service.")


class SimilarAnswer(Prediction):
    neighbours: list[Neighbour] = Field(
        description="The index's most similar paintings: the same picture first, then the "
        "nearest in style; k of them, fewer where max_distance leaves some out."
    )


class IndexSummary(BaseModel):
    model: str
    embedding: dict[str, Any]
    items: int
    search: str = Field(description="'exact', or 'ivf' (approximate).")
    metric: str
    max_k: int


class UrlError(ErrorBody):
    url: str


class BatchRequest(BaseModel):
    urls: list[str] = Field(min_length=1, max_length=MAX_BATCH_URLS)


class BatchAnswer(BaseModel):
    results: list[Prediction | UrlError] = Field(description="One per URL, in order.")


class Status(BaseModel):
    status: str
    model: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


def _accepted_media_types() -> list[str]:
    """The media types of the image formats the decoder accepts, from Pillow's registry."""
    Image.init()
    return [Image.MIME[name] for name in ACCEPTED_FORMATS]


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": UrlRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                    "required": [UPLOAD_FIELD],
                }
            },
            **{
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in _accepted_media_types()
            },
        },
    }
}
PREDICT_ERRORS = _errors(400, 403, 408, 413, 415, 422, 502, 503, 504)


def create_app(
    config: ServeConfig,
    bundle: ModelBundle | None = None,
    load_model: Callable[[], Classifier] | None = None,
    load_grad_cam: Callable[[], GradCam] | None = None,
    index: VectorIndex | None = None,
) -> FastAPI:
    """The service for `config`; `load_model` (one model for every batch shape) and
    `load_grad_cam` replace the bundle's loaders (tests share one model among several
    apps); `index`, config.index already opened. The model loads when the app starts (its
    lifespan)."""
    bundle = bundle or ModelBundle.load(config.model)
    if config.index is not None and index is None:
        from pipeline.similar import open_index

        index = open_index(config.index, bundle)
    service = StyleService(config, bundle, load_model, load_grad_cam, index)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPIOffline(  # /docs and /redoc from files of its own package, not a CDN
        title="artstyle",
        summary="The art style of paintings.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(
        RequestBodies,
        max_bytes=config.max_image_bytes,
        timeout_s=config.fetch_timeout_s,
        budget=service.bodies,
    )
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: counts all
    app.include_router(_api_routes(service))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _api_routes(service: StyleService) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/predict",
        response_model=Prediction,
        response_model_exclude_none=True,
        responses=PREDICT_ERRORS,
        openapi_extra=PREDICT_BODY,
        summary="The styles of one image",
    )
    async def predict(
        request: Request,
        heatmap: bool = Query(False, description="Add Grad-CAM's heatmap for the top style."),
    ) -> dict[str, Any]:
        return await _answer_image(service, request, heatmap)

    @router.post(
        "/similar",
        response_model=SimilarAnswer,  # a neighbour's fields are all there, null or not
        responses=PREDICT_ERRORS | _errors(404),
        openapi_extra=PREDICT_BODY,
        summary="The index's paintings most like one image, and its styles",
    )
    async def similar(
        request: Request,
        k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many neighbours."),
        max_distance: float | None = Query(
            None,
            ge=0,
            le=2,
            description="Leave out neighbours farther than this in style (the same picture "
            "stays, whatever its style's distance).",
        ),
        heatmap: bool = Query(False, description="Add Grad-CAM's heatmap for the top style."),
    ) -> dict[str, Any]:
        service.check_index()  # before the body is read
        return await _answer_image(service, request, heatmap, NeighbourQuery(k, max_distance))

    @router.get(
        "/similar/index",
        response_model=IndexSummary | None,
        summary="What the index of similar paintings holds (null: the service has none)",
    )
    async def similar_index() -> dict[str, Any] | None:
        return service.similar.describe() if service.similar is not None else None

    @router.get(
        THUMBNAIL_ROUTE,
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **_errors(403, 404, 502, 503, 504)},
        summary="A small JPEG of an item of the index",
    )
    async def thumbnail(
        item_id: int, if_none_match: str | None = Header(None, include_in_schema=False)
    ) -> Response:
        similar = service.check_index()
        similar.uri_of(item_id)  # 404 for an unknown id, even to a client with an ETag
        etag = similar.etag(item_id)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # kept, and checked each time
        if if_none_match is not None and _names(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        data = await service.thumbnail(item_id)
        return Response(data, media_type="image/jpeg", headers=headers)

    @router.post(
        "/predict/batch",
        response_model=BatchAnswer,
        response_model_exclude_none=True,
        responses=_errors(400, 413, 422, 503),
        summary=f"The styles of up to {MAX_BATCH_URLS} images at URLs",
    )
    async def predict_batch(body: BatchRequest) -> dict[str, Any]:
        with service.fetching(len(body.urls)):
            results = await asyncio.gather(*(_answer_or_error(service, url) for url in body.urls))
        return {"results": results}

    @router.get("/health/live", response_model=Status, responses=_errors(503))
    async def live() -> dict[str, str]:
        if service.state is ModelState.FAILED:
            service.check_ready()  # raises: a process that cannot serve should be replaced
        return {"status": "live", "model": service.bundle.id}

    @router.get("/health/ready", response_model=Status, responses=_errors(503))
    async def ready() -> dict[str, str]:
        service.check_ready()
        return {"status": "ready", "model": service.bundle.id}

    @router.get("/model", summary="The model bundle's manifest")
    async def model() -> dict[str, Any]:
        return service.bundle.manifest.to_json()

    @router.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/", response_class=FileResponse, summary="A page to try the model")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return router


def _names(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weakly, as RFC 9110 compares there),
    or any entity (*)."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


async def _answer_image(
    service: StyleService,
    request: Request,
    heatmap: bool,
    similar: NeighbourQuery | None = None,
) -> dict[str, Any]:
    """The answer for the image a request sends or names (bodies.py)."""
    source = await read_image_source(request)  # before any place: a slow body holds none
    if source.url is not None:
        with service.fetching():
            return await service.predict_url(source.url, heatmap, similar)
    assert source.data is not None  # an ImageSource holds exactly one of the two
    return await service.predict_image(source.data, heatmap=heatmap, similar=similar)


async def _answer_or_error(service: StyleService, url: str) -> dict[str, Any]:
    """One URL's answer, or its error in its place."""
    try:
        return await service.predict_url(url)
    except ServiceError as error:
        return {"url": url, **error.body()}
    except Exception:
        logger.exception("artstyle: predicting %s failed", url)
        return {"url": url, **internal_error(f"predicting {url}").body()}
