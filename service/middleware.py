"""Pure ASGI middleware: request accounting, API-key check, and the payload limit.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because the latter runs the endpoint in a separate task
(breaking client-disconnect detection) and buffers streaming bodies. Order, outermost first:
:class:`Observe` (timing, metrics, access log, last-resort JSON 500) -> :class:`ApiKey` (before any body is read,
so an unauthenticated 10 MB upload costs nothing) -> :class:`BodyLimit` -> the FastAPI router.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from service.errors import asgi_error
from service.logs import REQUEST_ID

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.middleware")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
OPEN_PATHS = frozenset(
    {"/health", "/ping", "/metrics", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
# TEI answers health on GET / (POST / is inference and needs the key like every other inference route)
OPEN_GET_PATHS = frozenset({"/"})


async def _send_error(
    send: Send, scope: Scope, status: int, message: str, error_type: str, headers: dict[str, str] | None = None
) -> None:
    status, hdrs, body = asgi_error(status, message, error_type, headers, scope.get("path", ""))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Observe:
    """Times every request, labels it by route template (bounded cardinality), logs it, and turns an exception
    that escaped everything else into a JSON 500 instead of a dropped connection."""

    def __init__(self, app: ASGIApp, *, metrics_of: Callable[[], Any], routes: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self._metrics_of = metrics_of
        self._routes = routes
        self._known: frozenset[str] | None = None

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        if self._known is None:
            self._known = frozenset(self._routes())
        return scope["path"] if scope["path"] in self._known else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        st = scope.setdefault("state", {})
        st.update(request_id=request_id, t_start=start, t_arrival=time.monotonic())  # deadlines count from here
        status = 500
        started = False
        context = REQUEST_ID.set(request_id)  # every log line of this request carries it

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers") or []) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer JSON
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            metrics = self._metrics_of()
            if metrics is not None:
                metrics.failure("internal")
            if not started:
                await _send_error(send_wrapper, scope, 500, "internal error", "internal")
            status = 500
        finally:
            elapsed = time.perf_counter() - start
            route = self._route(scope)
            metrics = self._metrics_of()
            if metrics is not None:
                metrics.observe_request(route, status, elapsed)
            extra = {"request_id": request_id, "route": route, "status": status, "duration_ms": round(elapsed * 1e3, 3)}
            if st.get("openai_user") is not None:  # OpenAI's `user`: who the client says the request is for
                extra["user"] = str(st["openai_user"])[:256]
            access_log.info(
                "%s %s %d %.1fms", scope.get("method"), scope.get("path"), status, elapsed * 1e3, extra=extra
            )
            REQUEST_ID.reset(context)


class ApiKey:
    """``Authorization: Bearer <key>`` on every path except the probes, metrics and docs."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        metrics_of: Callable[[], Any],
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._metrics_of = metrics_of
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self._key is None
            or scope["path"] in self._open
            or (scope["path"] in OPEN_GET_PATHS and scope.get("method") in ("GET", "HEAD"))
        ):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest on equal-type bytes: the time taken does not reveal how much of the key matched
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        metrics = self._metrics_of()
        if metrics is not None:
            metrics.failure("unauthorized")
            metrics.auth_failures.labels("missing" if not header.strip() else "invalid").inc()
        await _send_error(
            send,
            scope,
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )


class BodyLimit:
    """Reads the whole body before the app does, refusing more than ``limit`` bytes (declared or streamed,
    chunked included) with 413, and bodies that are not UTF-8 with 422 (FastAPI would say 400)."""

    def __init__(self, app: ASGIApp, *, limit: int, metrics_of: Callable[[], Any]) -> None:
        self.app = app
        self.limit = limit
        self._metrics_of = metrics_of

    async def _reject(self, send: Send, scope: Scope, status: int, message: str, kind: str) -> None:
        metrics = self._metrics_of()
        if metrics is not None:
            metrics.failure(kind)
        await _send_error(send, scope, status, message, kind, {"Connection": "close"} if status == 413 else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        too_large = f"the request body is larger than the limit of {self.limit} bytes"
        if declared is not None:
            try:
                if int(declared) > self.limit:
                    await self._reject(send, scope, 413, too_large, "payload_too_large")
                    return
            except ValueError:
                await self._reject(send, scope, 400, "invalid Content-Length header", "validation")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send, scope, 413, too_large, "payload_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and (not ctype or ctype.endswith(b"json")):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await self._reject(
                    send, scope, 422, f"the request body is not valid UTF-8 (byte {exc.start})", "validation"
                )
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect, which routes use to cancel work

        await self.app(scope, replay, send)
