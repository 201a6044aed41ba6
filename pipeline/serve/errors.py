"""Every error the service answers: `{"error": {"kind": ..., "message": ...}}` with a status
that fits, and never a stack trace.

The pipeline's image error kinds (transforms/fetch.py, transforms/images.py) are the
image's fault, 422, except those that are the network's or the guard's:

    forbidden_address   403  the URL's host has no public address (see guard.py)
    fetch_failed        502  the URL could not be read (unreachable, refused, HTTP error)
    timed_out           504  the URL's image did not arrive within --fetch_timeout_s

An image the index names (a thumbnail's) is not the client's to mend: every kind but
those three is 502 there, the service's source at fault.

The service adds its own: body_too_large 413, unsupported_media_type 415,
invalid_request 400 or 422, empty 422, body_timeout 408, overloaded and not_ready 503
(with Retry-After), model_failed 503, unknown_route 404, method_not_allowed 405,
no_index 404 (a similar-paintings route on a service without --index), unknown_item 404
(an id the index does not have), internal 500, and client_disconnected 499 (nginx's
"client closed request"): a client that hung up before its body was in, never sent, but
counted apart in the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from transforms.images import ImageError

IMAGE_ERROR_STATUS = {"forbidden_address": 403, "fetch_failed": 502, "timed_out": 504}
IMAGE_FAULT_STATUS = 422
INDEX_IMAGE_FAULT_STATUS = 502

# What a client is told to wait before trying again when the service is at its limit.
OVERLOADED_RETRY_AFTER_S = 1

# Starlette's own HTTPExceptions (no route, wrong method, a malformed multipart body).
KIND_OF_STATUS = {400: "invalid_request", 404: "unknown_route", 405: "method_not_allowed"}


class ErrorDetail(BaseModel):
    kind: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ServiceError(HTTPException):
    """An answer other than 200. An HTTPException, so that it passes through FastAPI's and
    Starlette's body parsing (a body over the cap is found while they read it)."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: int | None = None):
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(status, message, headers)
        self.kind = kind
        self.message = message

    @classmethod
    def of_image(cls, error: ImageError, fault_status: int = IMAGE_FAULT_STATUS) -> ServiceError:
        """`fault_status` for a kind that is the image's fault: 422 for a request's image,
        INDEX_IMAGE_FAULT_STATUS for one the index names."""
        status = IMAGE_ERROR_STATUS.get(error.kind, fault_status)
        return cls(status, error.kind, error.message)

    def body(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status_code, self.headers)


def internal_error(what: str) -> ServiceError:
    """A bug or a library's surprise: its traceback goes to the log, never to the client."""
    return ServiceError(500, "internal", f"{what} failed inside the service; see its log")


def overloaded(why: str) -> ServiceError:
    """503 with Retry-After: the service holds as much as it may; a balancer can go elsewhere."""
    message = f"the service is at its limit ({why}); try again shortly"
    return ServiceError(503, "overloaded", message, retry_after_s=OVERLOADED_RETRY_AFTER_S)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if isinstance(error, ServiceError):
            return error.response()
        kind = KIND_OF_STATUS.get(error.status_code, f"http_{error.status_code}")
        answer = ServiceError(error.status_code, kind, str(error.detail))
        answer.headers = error.headers  # 405's Allow
        return answer.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return ServiceError(422, "invalid_request", validation_message(error.errors())).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """Starlette logs the traceback after this answer is sent."""
        return internal_error(f"{request.method} {request.url.path}").response()


def validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic's first complaint, as one line: `urls: List should have at most 32 items`."""
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'body'}: {first.get('msg', 'invalid')}{more}"
