"""Request bodies: the cap on their size, and the three ways /predict takes an image.

application/json      {"url": "https://..."}: the image is fetched (guard.py)
multipart/form-data   the image in the field `file` (an HTML form's upload)
image/*               the image itself as the body
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serve.errors import ServiceError, validation_message

UPLOAD_FIELD = "file"


class UrlRequest(BaseModel):
    """The original demo's request."""

    url: str = Field(description="An http(s) URL of an image.", examples=["https://..."])


@dataclass(frozen=True)
class ImageSource:
    """Exactly one of the two: the image's bytes, or the URL to fetch them from."""

    data: bytes | None = None
    url: str | None = None


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused (413) as soon as its declared
    length or the bytes received so far show it, so no request buffers more than that."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            if received == 0:
                self._check(_declared_length(scope))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                self._check(received)
            return message

        await self.app(scope, capped_receive, send)

    def _check(self, length: int) -> None:
        if length > self.max_bytes:
            message = f"the body is over the service's cap of {self.max_bytes:,} bytes"
            raise ServiceError(413, "body_too_large", message)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def read_image_source(request: Request, timeout_s: float) -> ImageSource:
    """What a /predict request asks about, read within `timeout_s` (a client that trickles
    its body would otherwise hold its place in the queue for ever)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        async with asyncio.timeout(timeout_s):
            if media_type == "application/json":
                return ImageSource(url=_url_of(await request.body()))
            if media_type == "multipart/form-data":
                return ImageSource(data=await _uploaded_file(request))
            if media_type.startswith("image/"):
                return ImageSource(data=await request.body())
    except TimeoutError:
        message = f"the request's body did not arrive within {timeout_s:g} s"
        raise ServiceError(408, "body_timeout", message) from None
    said = f"Content-Type {media_type}" if media_type else "no Content-Type"
    message = (
        f'/predict takes application/json ({{"url": ...}}), multipart/form-data (field '
        f"'{UPLOAD_FIELD}') or an image/* body, not {said}"
    )
    raise ServiceError(415, "unsupported_media_type", message)


def _url_of(body: bytes) -> str:
    try:
        return UrlRequest.model_validate_json(body).url
    except ValidationError as error:
        raise ServiceError(422, "invalid_request", validation_message(error.errors())) from None


async def _uploaded_file(request: Request) -> bytes:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            message = f"the form has no file in a field named '{UPLOAD_FIELD}'"
            raise ServiceError(422, "invalid_request", message)
        return await upload.read()
