"""Helpers shared by the service tests: a loaded tiny model, an in-process client, reference outputs.

The fixture here is imported by the test modules (rather than living in conftest.py, which the engine tests
own); loading the tiny model takes well under a second, so one load per module is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir: Path) -> Any:
    from engine.checkpoint import load_model

    return load_model(tiny_model_dir)


def settings(model: Path | str, **overrides: Any) -> Settings:
    """Settings isolated from the developer's UFB_* environment and .env files."""
    return Settings(_env_file=None, model=Path(model), **overrides)  # type: ignore[call-arg]


@contextlib.asynccontextmanager
async def running(app: Any, *, wait_ready: bool = True, **client_kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30, **client_kw) as c:
            if wait_ready:
                for _ in range(500):
                    if (await c.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError(f"never ready: {(await c.get('/ready')).text}")
            yield c


def make_app(loaded: Any, **overrides: Any) -> Any:
    return create_app(settings(loaded.path, **overrides), loaded)


def reference_embedding(loaded: Any, text: str | list[int], normalize: bool = True) -> torch.Tensor:
    """The input computed alone, with no batching, padding or service in the way."""
    tok = loaded.tokenizer
    ids = tok.encode([text], max_length=10**6, truncate=False)[0] if isinstance(text, str) else list(text)
    input_ids, mask = tok.pad([ids])
    with torch.inference_mode():
        return loaded.model.embed(input_ids, mask, normalize=normalize)[0]


def reference_logits(loaded: Any, text: str) -> torch.Tensor:
    tok = loaded.tokenizer
    input_ids, mask = tok.pad(tok.encode([text], max_length=10**6, truncate=False))
    with torch.inference_mode():
        return loaded.model.classify(input_ids, mask)[0]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels); parsing validates it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def serve_in_thread(app: Any, *, ready: bool = True) -> Any:
    """The app behind a real uvicorn on a free loopback port, in a background thread; yields its base URL.

    Real sockets matter for slow readers and vanishing clients (uvicorn's flow control and disconnect
    detection), which the in-process transport cannot show.
    """
    import threading
    import time

    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not (server.started and server.servers) and time.monotonic() < end:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            while httpx.get(url + "/ready", timeout=5).status_code != 200:
                assert time.monotonic() < end, "never ready"
                time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(20)


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def text_of(i: int) -> str:
    """A deterministic sentence of 1 to 60 words, different for each ``i``."""
    n = 1 + (i * 13) % 60
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def run(coro: Any) -> Any:
    """Run a coroutine to completion, failing after two minutes rather than hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, 120))


def wait_until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)
