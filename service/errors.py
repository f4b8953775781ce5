"""One error mapping for every failure, rendered in the shape of the API the client called.

Why centralised: the promise is "never a 500 for anything a client can send", which only holds if every path
(validation, routing, batcher, middleware) ends in the same mapping. Batcher errors keep their own classes in
``engine.errors`` (the engine must not know HTTP); this module decides their status codes.

Each error has a status and a ``kind`` (lowercase, stable: the ``cause`` label of ``ufb_failures_total``). The
body follows the caller's API: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI routes
(``/v1/*`` and their aliases), TEI's ``{"error": message, "error_type": type}`` everywhere else, where the type is
TEI's own name (``Validation``, ``Empty``, ``Overloaded``, ...) for the kinds TEI has and ours for the others.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import errors as b
from service.responses import JSON

log = logging.getLogger("service.errors")


class ServiceError(Exception):
    """An error raised by a route with the status and kind the client should see; ``param`` names the request
    field at fault where there is one (OpenAI's ``param``)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}
        self.param = param


def empty(message: str = "the input is empty", param: str | None = None) -> ServiceError:
    return ServiceError(400, message, "empty", param=param)


def validation(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(422, message, "validation", param=param)


def too_many_inputs(n: int, limit: int, param: str | None = None) -> ServiceError:
    return ServiceError(
        413, f"the request has {n} inputs, more than the maximum of {limit}; split it", "too_many_inputs", param=param
    )


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


# ---------------------------------------------------------------------------------------------------- bodies

# TEI's ErrorType names (router/src/lib.rs), for the kinds TEI has; too many inputs is TEI's "batch size" error.
TEI_TYPES = {
    "empty": "Empty",
    "validation": "Validation",
    "too_many_inputs": "Validation",
    "tokenizer": "Tokenizer",
    "overloaded": "Overloaded",
    "unhealthy": "Unhealthy",
    "backend": "Backend",
}

# OpenAI's error ``code`` where OpenAI has one for the case; otherwise the code is our kind.
_OPENAI_CODES = {"unauthorized": "invalid_api_key", "model_not_found": "model_not_found"}


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible routes: ``/v1/...`` and the un-prefixed aliases ``/embeddings`` and ``/models...``."""
    return path.startswith("/v1/") or path in ("/v1", "/embeddings", "/models") or path.startswith("/models/")


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    message: str, error_type: str, *, status: int = 400, path: str = "", param: str | None = None
) -> dict[str, Any]:
    """The JSON body for an error of ``error_type`` (our kind) answering a request for ``path``."""
    if is_openai_path(path):
        return {
            "error": {
                "message": message,
                "type": _openai_type(status),
                "param": param,
                "code": _OPENAI_CODES.get(error_type, error_type),
            }
        }
    return {"error": message, "error_type": TEI_TYPES.get(error_type, error_type)}


def error_response(
    request: Request | None,
    status: int,
    message: str,
    error_type: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSON:
    """Build the JSON error and count it under ``ufb_failures_total{cause}``."""
    path = ""
    if request is not None:
        path = request.url.path
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.failure(error_type)
    return JSON(
        error_body(message, error_type, status=status, path=path, param=param), status_code=status, headers=headers
    )


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


def _param_of(exc: RequestValidationError) -> str | None:
    """The top-level request field of the first validation error (``input``, ``dimensions``, ...), if any."""
    for err in exc.errors()[:1]:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if loc and isinstance(loc[0], str):
            return loc[0]
    return None


_HTTP_TYPES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install(app: FastAPI) -> None:
    """Register handlers so that no request can produce a non-JSON or a 500 error by itself."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSON:
        return error_response(request, exc.status, exc.message, exc.error_type, exc.headers, exc.param)

    @app.exception_handler(b.BatcherError)
    async def _batcher(request: Request, exc: b.BatcherError) -> JSON:
        err = from_batcher(exc)
        return error_response(request, err.status, err.message, err.error_type, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        return error_response(request, 422, _describe_validation(exc), "validation", param=_param_of(exc))

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


def asgi_error(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None, path: str = ""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The same body for middleware that answers before FastAPI sees the request."""
    body = json.dumps(error_body(message, error_type, status=status, path=path)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, hdrs, body
