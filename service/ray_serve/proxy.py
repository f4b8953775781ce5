"""Middleware for Ray Serve's HTTP proxy: a request whose replica dies answers a JSON 502, not a bare 500.

When a replica dies with requests on it, Ray's proxy ends those requests without any response and uvicorn fills
in ``500 Internal Server Error`` as plain text: indistinguishable from a bug, and not in the service's error shape.
This middleware turns "the proxy produced no response" into ``502 {"error": ..., "error_type": "replica_failed"}``
with ``Retry-After: 1`` (embedding and classification requests are safe to retry; other replicas take them).

Ray loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve.proxy:middlewares``, an environment
variable of the nodes (the proxies read it when they start): ``ultrafastbert serve --ray`` sets it for the local
cluster it starts; ``docker/ray/`` sets it for clusters. Responses the proxy or a replica did send pass unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware

log = logging.getLogger("service.ray")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "service.ray_serve.proxy:middlewares"
MESSAGE = (
    "the replica handling this request failed before answering (it died or was stopped); "
    "other replicas take new requests, so it can be retried"
)


class ReplicaFailed:
    """Pure ASGI: if the wrapped proxy app returns (or raises) without starting a response, answer 502 JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.warning("%s %s: no response from the replica", scope.get("method"), scope.get("path"), exc_info=True)
        if not started:
            # the service's error shape, built here: importing service.errors would load torch into every proxy
            body = json.dumps({"error": MESSAGE, "error_type": "replica_failed"}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ]
            # Ray's request-id middleware (inside this one) put the id on the request; the client gets it back
            headers += [(b"x-request-id", v) for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"][:1]
            await send({"type": "http.response.start", "status": 502, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})


def middlewares() -> list[Middleware]:
    """The proxy callback (see the module docstring)."""
    return [Middleware(ReplicaFailed)]
