"""The HTTP/1.1 protocol uvicorn runs for the service: uvicorn's own (httptools, else h11) with one change.

uvicorn arms its keep-alive timer only after a response, so a client that connects and never sends a request
holds its connection (a file descriptor, a protocol object) for ever. Here the same timer also starts on
connect: silent connections are closed after ``keep_alive_timeout_s``, like idle ones between requests. The
first byte received cancels it, exactly as between requests.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class IdleClosingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
