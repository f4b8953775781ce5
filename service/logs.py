"""Logging setup: human-readable text, or JSON lines for log shippers (``UFB_LOG_FORMAT=json``).

Fields passed with ``extra={...}`` (request id, route, status, timings) become JSON keys, so access logs can be
queried without regexes. Every line logged while a request is handled carries its ``request_id`` (the middleware
sets :data:`REQUEST_ID` for the request's context; asyncio tasks and ``asyncio.to_thread`` inherit it).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("ufb_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to records logged inside it (an explicit ``extra`` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str | int | float | bool | None] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain text, with ``extra`` fields appended as key=value so nothing is lost in text mode."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = [f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")]
        return base + (" " + " ".join(extras) if extras else "")


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Route the root logger and uvicorn's loggers through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # our access log (service.access) replaces uvicorn's, which has neither timings nor JSON
    logging.getLogger("uvicorn.access").disabled = True
