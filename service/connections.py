"""How the service's HTTP server treats connections: uvicorn's HTTP/1.1 protocol (httptools, else h11) with one
change, and the uvicorn options that set keep-alive and the accept backlog (docs/overload.md).

uvicorn arms its keep-alive timer only after a response, so a client that connects and never sends a request
holds its connection (a file descriptor, a protocol object) for ever. Here the same timer also starts on
connect: silent connections are closed after ``keep_alive_timeout_s``, like idle ones between requests.
Invariant: the timer is only ever armed while no request is in progress (on connect, and by uvicorn after a
complete response); the first byte received cancels it, so it never closes a connection that has begun sending
a request or is being answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.settings import Settings


class IdleClosingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    timeout_keep_alive_task: asyncio.TimerHandle | None  # uvicorn's, set in its __init__

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:  # one timer per connection, whichever side armed it
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )


def connection_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` keyword arguments for connections: the protocol above, its keep-alive timeout (also
    advertised in a ``Keep-Alive`` header on every response) and the accept backlog."""
    return {
        "http": IdleClosingHTTPProtocol,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "backlog": settings.backlog,
        "headers": [("Keep-Alive", f"timeout={settings.keep_alive_timeout_s}")],
    }
