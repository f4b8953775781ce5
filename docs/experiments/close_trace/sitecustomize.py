"""Counts how uvicorn's HTTP connections end (docs/overload.md), when ``UFB_TRACE_CLOSES`` names a file:

    PYTHONPATH=docs/experiments/close_trace UFB_TRACE_CLOSES=/tmp/closes.log .venv/bin/ultrafastbert serve ...

Every 5 s it appends the counts: connections made and lost, keep-alive closes, keep-alive closes with request
bytes already received but unread (FIONREAD > 0), connections lost in the middle of a request, 400s from the
parser. Instrumentation only; the service never imports it.
"""

import os

if os.environ.get("UFB_TRACE_CLOSES"):
    import array
    import collections
    import fcntl
    import termios
    import threading
    import time

    from uvicorn.protocols.http import httptools_impl as h

    counts: collections.Counter = collections.Counter()
    out = open(os.environ["UFB_TRACE_CLOSES"], "a", buffering=1)  # noqa: SIM115

    def unread(transport) -> int:
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(transport.get_extra_info("socket").fileno(), termios.FIONREAD, buf)
        except OSError:
            return -1
        return buf[0]

    def wrap(name, before):
        original = getattr(h.HttpToolsProtocol, name)

        def wrapper(self, *args):
            before(self, *args)
            return original(self, *args)

        setattr(h.HttpToolsProtocol, name, wrapper)

    def on_keepalive(self) -> None:
        counts["keepalive_close"] += 1
        if unread(self.transport):
            counts["keepalive_close_with_unread"] += 1

    def on_lost(self, exc) -> None:
        counts["lost"] += 1
        if self.cycle is not None and not self.cycle.response_complete:
            counts["lost_mid_request"] += 1

    wrap("timeout_keep_alive_handler", on_keepalive)
    wrap("connection_made", lambda self, t: counts.update(["made"]))
    wrap("connection_lost", on_lost)
    wrap("send_400_response", lambda self, msg: counts.update(["parser_400"]))

    def dump() -> None:
        while True:
            time.sleep(5)
            out.write(f"{time.time():.3f} {dict(counts)}\n")

    threading.Thread(target=dump, daemon=True).start()
