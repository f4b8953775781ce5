"""The Ray Serve deployment: the same FastAPI app (``service.app.create_app``) behind ``@serve.ingress``.

Each replica is a Ray actor that loads its own model, runs its own batcher (one inference thread, torch threads =
its Ray CPUs) and owns its own metrics registry, exactly like one ``ultrafastbert serve`` process; Ray's HTTP
proxy spreads requests over the replicas. What the replica adds to the app, and why:

* the app's lifespan is wrapped so that startup returns only once the model is warm: Ray routes traffic to a
  replica as soon as its startup returns, and a replica that cannot load its model fails its start (with the
  reason in ``serve status``) instead of answering 503 for ever;
* its own Prometheus endpoint and discovery entry (:mod:`service.ray_serve.discovery`), plus ``GET /ray/targets``;
* an ``x-ufb-replica`` header on every response, so a client (and the tests) can tell replicas apart;
* ``check_health``, which Ray polls: a replica whose service failed is restarted.

Entry points: :func:`build_app` (``serve run service.ray_serve.deployment:build_app key=value ...`` and the
``import_path`` of ``docker/ray/serve-config.yaml``), the module attribute ``app`` (the defaults, for a plain
``serve run service.ray_serve.deployment:app``), and ``ultrafastbert serve --ray`` (:mod:`service.ray_serve.launch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from starlette.types import Lifespan as AppLifespan

from service.app import create_app
from service.ray_serve import discovery
from service.ray_serve.options import DEPLOYMENT_NAME, REPLICA_HEADER, TARGETS_PATH, RayOptions, split_args
from service.responses import JSON
from service.settings import Settings
from service.state import Phase, load_from_settings

log = logging.getLogger("service.ray")

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


class ReplicaHeader:
    """Pure ASGI middleware: ``x-ufb-replica: <replica id>`` on every HTTP response.

    It also drops the app's own ``x-request-id``: Ray's proxy adds its request id (the client's, when it sent
    one) to every response, and a second copy of the header would only confuse clients.
    """

    def __init__(self, app: Any, *, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*kept, self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class UltraFastBERTReplica:
    """One replica: model, batcher, metrics registry, ``/metrics`` endpoint and discovery entry of its own."""

    def __init__(self, settings: dict[str, Any] | None = None, ray_options: dict[str, Any] | None = None) -> None:
        import ray

        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag
        self.app_name = ctx.app_name
        self.deployment = ctx.deployment
        self.actor_name = ctx.replica_id.to_full_id_str()
        self.options = RayOptions(**(ray_options or {}))
        resolved = Settings(**(settings or {}))
        if resolved.torch_threads is None:  # threads follow the CPUs Ray reserved for this replica
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1.0
            resolved = resolved.model_copy(update={"torch_threads": max(1, int(cpus))})
        self.settings = resolved
        # loaded here, not in the app's lifespan: a broken folder fails the replica's start with one line naming
        # the problem (shown by `serve status`) rather than leaving a replica that never turns ready
        self.loaded = load_from_settings(
            resolved, hint="on this node; set the 'model' argument or UFB_MODEL to a folder present on every node"
        )
        self._state: Any = None
        self._metrics_server: discovery.MetricsServer | None = None
        self._registration: discovery.Registration | None = None
        log.info("replica %s: %s loaded, %d torch threads", self.replica, resolved.model, resolved.torch_threads)

    # -------------------------------------------------------------- the app (called by Ray after __init__)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, self.loaded)
        self._state = app.state.service
        app.add_api_route(TARGETS_PATH, self._targets, methods=["GET"], include_in_schema=False)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        app.router.lifespan_context = self._lifespan(app.router.lifespan_context)
        return app

    def _lifespan(self, inner: AppLifespan[Any]) -> Lifespan:
        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            async with inner(app):
                await self._until_ready()
                await asyncio.to_thread(self._start_discovery)
                try:
                    yield
                finally:
                    await asyncio.to_thread(self._stop_discovery)

        return lifespan

    async def _until_ready(self) -> None:
        while self._state.phase in (Phase.LOADING, Phase.WARMING):
            await asyncio.sleep(0.02)
        if self._state.phase != Phase.READY:
            message = f"replica {self.replica}: the service did not start: {self._state.error or self._state.phase}"
            log.error(message)
            raise RuntimeError(message)

    def _targets(self) -> JSON:
        """Prometheus ``http_sd_configs``: every live replica's own ``/metrics`` address and labels."""
        return JSON(discovery.live_targets(self.app_name))

    # -------------------------------------------------------------- metrics endpoint and discovery

    def _start_discovery(self) -> None:
        s = self.settings
        key = s.api_key.get_secret_value() if s.metrics_require_key and s.api_key is not None else None
        node = discovery.node_address()
        bind = self.options.metrics_host or node
        self._metrics_server = discovery.MetricsServer(
            self._state.metrics.registry, bind, self.options.metrics_port, key
        )
        host = node if bind in ("0.0.0.0", "::", "") else bind  # advertise something Prometheus can reach
        address = f"[{host}]:{self._metrics_server.port}" if ":" in host else f"{host}:{self._metrics_server.port}"
        labels = {"replica": self.replica, "deployment": self.deployment, "application": self.app_name}
        self._registration = discovery.Registration(
            self.app_name, self.replica, self.actor_name, address, labels, self.options.heartbeat_s
        )
        self._registration.start()
        log.info("replica %s: metrics at http://%s/metrics", self.replica, address)

    def _stop_discovery(self) -> None:
        if self._registration is not None:
            self._registration.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()

    # -------------------------------------------------------------- Ray's health check

    def check_health(self) -> None:
        """Ray restarts a replica whose check raises: here, one whose service failed after starting."""
        if self._state is not None and self._state.phase == Phase.FAILED:
            raise RuntimeError(f"replica {self.replica}: {self._state.error}")


def replica_settings(settings: Settings) -> dict[str, Any]:
    """What the replicas get: the non-default settings as plain values (a replica may run on another node, so the
    driver's environment must travel explicitly); the model path made absolute against the caller's directory."""
    values = settings.model_dump(mode="json", exclude_defaults=True)
    if settings.api_key is not None:
        values["api_key"] = settings.api_key.get_secret_value()
    if "model" in values:
        values["model"] = str(Path(values["model"]).expanduser().resolve())
    return values


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application from a flat dict of service settings and Ray options (unknown keys are an error).

    Settings are validated here, where the application is built, so a bad value fails the deploy once instead of
    every replica; the replicas still read ``UFB_*`` variables of their own nodes for settings not given.
    """
    settings_args, ray_args = split_args(args or {})
    settings = Settings(**settings_args)
    options = RayOptions(**ray_args)
    # @serve.deployment made the class a Deployment; mypy keeps a decorated class's own type
    deployment = cast(Deployment, UltraFastBERTReplica).options(
        **options.deployment_options(settings.shutdown_grace_s + settings.shutdown_delay_s)
    )
    return deployment.bind(replica_settings(settings), options.model_dump(mode="json"))


def __getattr__(name: str) -> Any:
    """``app``: the application with default arguments, built on access (``serve run ...deployment:app``)."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
