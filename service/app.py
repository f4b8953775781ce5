"""FastAPI application factory: wires settings, state, middleware, error handlers and routes together.

``create_app(settings, loaded_model=None)`` returns an app whose lifespan starts the batcher (loading the model
from ``settings.model`` first when none is given) in the background, so ``/health`` answers at once and
``/ready`` turns 200 when the model is warm. Shutdown drains admitted work before stopping the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from service import __version__, errors
from service.metrics import ServiceMetrics
from service.middleware import OPEN_PATHS, ApiKey, BodyLimit, Observe
from service.routes import router
from service.settings import Settings
from service.state import ServiceState
from service.submit import ClientGone

log = logging.getLogger("service")

DESCRIPTION = """Embeddings and classification with UltraFastBERT (fast-feedforward BERT).

OpenAI-compatible `/v1/embeddings`, TEI-compatible `/embed`, `/embed_all`, `/predict`, `/tokenize`, `POST /`, plus
`/classify`. Errors are TEI's `{"error": message, "error_type": type}`, and OpenAI's
`{"error": {"message", "type", "param", "code"}}` on the OpenAI routes (docs/compatibility.md). Inference responses
carry `x-queue-time`, `x-tokenization-time`, `x-inference-time`, `x-total-time` (ms) and `x-neurons-evaluated` /
`x-neurons-dense`.
"""


def create_app(settings: Settings | None = None, loaded_model: Any | None = None) -> FastAPI:
    """Build the app. ``loaded_model`` (an ``engine.checkpoint.LoadedModel``) skips loading; tests use it."""
    settings = settings or Settings()
    metrics = ServiceMetrics(half_life_tokens=settings.leaf_half_life_tokens, created_series=settings.metrics_created)
    state = ServiceState(settings, loaded_model, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(state.start(), name="ufb-start")
        try:
            yield
        finally:
            state.begin_shutdown()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            await state.shutdown()

    app = FastAPI(title="UltraFastBERT Serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = state
    app.state.metrics = metrics
    app.state.settings = settings
    errors.install(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do

    app.include_router(router)

    def metrics_of() -> ServiceMetrics:
        return metrics

    # add_middleware wraps: the last added is the outermost
    app.add_middleware(BodyLimit, limit=settings.payload_limit, metrics_of=metrics_of)
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    open_paths = OPEN_PATHS - {"/metrics"} if settings.metrics_require_key else OPEN_PATHS
    app.add_middleware(ApiKey, api_key=api_key, metrics_of=metrics_of, open_paths=open_paths)
    app.add_middleware(
        Observe,
        metrics_of=metrics_of,
        routes=lambda: (
            [getattr(r, "path", "") for r in router.routes]
            + [p for p in (app.openapi_url, app.docs_url, app.redoc_url) if p]
        ),
    )
    return app
