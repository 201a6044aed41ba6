"""Request bodies: their limits (size, deadline, memory), and the three ways /predict (and
/similar) take an image.

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

from pipeline.serve.errors import ServiceError, overloaded, validation_message

UPLOAD_FIELD = "file"


class UrlRequest(BaseModel):
    """The original demo's request."""

    url: str = Field(description="An http(s) URL of an image.", examples=["https://..."])


@dataclass(frozen=True)
class ImageSource:
    """Exactly one of the two: the image's bytes, or the URL to fetch them from."""

    data: bytes | None = None
    url: str | None = None


class BodyBudget:
    """The bytes of request bodies the service holds at once. A body holds what it has sent
    so far, until its answer: a client that trickles its body holds next to nothing, so
    slow clients cannot crowd out others; only bodies that have arrived can fill it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Holds `size` more bytes, or refuses them (503 overloaded) past the limit."""
        if self.held + size > self.limit:
            raise overloaded(f"bodies hold {self.held:,} of {self.limit:,} bytes")
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


class RequestBodies:
    """ASGI middleware: every request's body, whichever route reads it, must stay under
    `max_bytes` (413, as soon as its declared length or the bytes so far show it), arrive
    whole within `timeout_s` of the request (408), and fit in the budget of bodies in
    memory (503). A client that hangs up before its body is whole is answered 499: its
    own doing, counted apart from the service's errors, and no one is there to read it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float, budget: BodyBudget):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = IncomingBody(self, receive, _declared_length(scope))
        try:
            await self.app(scope, body.receive, send)
        finally:
            self.budget.give_back(body.received)

    def check_size(self, length: int) -> None:
        if length > self.max_bytes:
            message = f"the body is over the service's cap of {self.max_bytes:,} bytes"
            raise ServiceError(413, "body_too_large", message)


class IncomingBody:
    """One request's body as it arrives, under its `RequestBodies`' rules; the app reads it
    through `receive`."""

    def __init__(self, rules: RequestBodies, receive: Receive, declared_length: int):
        self._rules = rules
        self._receive = receive
        self._declared_length = declared_length
        self._deadline = asyncio.get_running_loop().time() + rules.timeout_s
        self.received = 0
        self.complete = False

    async def receive(self) -> Message:
        if self.complete:  # the body is in: what follows is the connection's end
            return await self._receive()
        if self.received == 0:
            self._rules.check_size(self._declared_length)
        event = await self._next_event()
        if event["type"] == "http.disconnect":
            raise ServiceError(499, "client_disconnected", "the client left before its body was in")
        chunk = len(event.get("body", b""))
        self._rules.check_size(self.received + chunk)
        self._rules.budget.take(chunk)
        self.received += chunk
        self.complete = not event.get("more_body", False)
        return event

    async def _next_event(self) -> Message:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._receive()
        except TimeoutError:
            timeout_s = self._rules.timeout_s
            message = f"the request's body did not arrive within {timeout_s:g} s"
            raise ServiceError(408, "body_timeout", message) from None


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def read_image_source(request: Request) -> ImageSource:
    """What a /predict or /similar request asks about (its body's limits are
    `RequestBodies`')."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        return ImageSource(url=_url_of(await request.body()))
    if media_type == "multipart/form-data":
        return ImageSource(data=await _uploaded_file(request))
    if media_type.startswith("image/"):
        return ImageSource(data=await request.body())
    said = f"Content-Type {media_type}" if media_type else "no Content-Type"
    message = (
        f'{request.url.path} takes application/json ({{"url": ...}}), multipart/form-data (field '
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
