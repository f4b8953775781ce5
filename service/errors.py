"""One error shape for every failure: ``{"error": message, "error_type": type}`` with the right status.

Why centralised: the promise is "never a 500 for anything a client can send", which only holds if every path
(validation, routing, batcher, middleware) ends in the same mapping. Batcher errors keep their own classes in
``engine.batcher`` (the engine must not know HTTP); this module decides their status codes.
"""

from __future__ import annotations

import logging
import math
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import batcher as b
from service.responses import JSON

log = logging.getLogger("service.errors")


class ServiceError(Exception):
    """An error raised by a route with the status and type the client should see."""

    def __init__(self, status: int, message: str, error_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}


def empty(message: str = "the input is empty") -> ServiceError:
    return ServiceError(400, message, "empty")


def validation(message: str) -> ServiceError:
    return ServiceError(422, message, "validation")


def too_many_inputs(n: int, limit: int) -> ServiceError:
    return ServiceError(413, f"the request has {n} inputs, more than the maximum of {limit}; split it",
                        "too_many_inputs")


def not_ready(message: str = "the model is not ready") -> ServiceError:
    return ServiceError(503, message, "unhealthy")


_BATCHER_STATUS: dict[type[b.BatcherError], tuple[int, str]] = {
    b.EmptyInput: (400, "empty"),
    b.InvalidInput: (422, "validation"),
    b.Overloaded: (429, "overloaded"),
    b.ShuttingDown: (503, "unhealthy"),
    b.DeadlineExceeded: (504, "timeout"),
    b.InferenceFailed: (500, "backend"),
}


def from_batcher(exc: b.BatcherError) -> ServiceError:
    for cls in type(exc).__mro__:
        if cls in _BATCHER_STATUS:
            status, kind = _BATCHER_STATUS[cls]
            break
    else:
        status, kind = 500, "backend"
    headers = {}
    if isinstance(exc, b.Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return ServiceError(status, str(exc), kind, headers)


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def error_response(request: Request | None, status: int, message: str, error_type: str,
                   headers: dict[str, str] | None = None) -> JSON:
    """Build the JSON error and count it under ``ufb_failures_total{cause}``."""
    if request is not None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.failure(error_type)
    return JSON(error_body(message, error_type), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    """A short human message; the first few pydantic errors are enough to fix a request."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"invalid JSON: {ctx.get('error', msg)}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


_HTTP_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type"}


def install(app: FastAPI) -> None:
    """Register handlers so that no request can produce a non-JSON or a 500 error by itself."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSON:
        return error_response(request, exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(b.BatcherError)
    async def _batcher(request: Request, exc: b.BatcherError) -> JSON:
        err = from_batcher(exc)
        return error_response(request, err.status, err.message, err.error_type, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        return error_response(request, 422, _describe_validation(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSON:
        status, detail = exc.status_code, str(exc.detail)
        if status == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, ValueError)):
            # FastAPI reports bodies json.loads cannot even decode (bad UTF-8) as a bare 400.
            status, detail = 422, "the request body is not valid UTF-8 JSON"
        kind = "validation" if status in (400, 422) else _HTTP_TYPES.get(status, "http")
        return error_response(request, status, detail, kind, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSON:  # pragma: no cover - last resort
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}", "internal")


def asgi_error(status: int, message: str, error_type: str,
               headers: dict[str, str] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The same body for middleware that answers before FastAPI sees the request."""
    import json

    body = json.dumps(error_body(message, error_type)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, hdrs, body
