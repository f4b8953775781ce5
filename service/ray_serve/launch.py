"""``ultrafastbert serve --ray``: deploy the service on a Ray cluster (a new local one by default) and keep it
running until SIGINT/SIGTERM, like ``serve run``; then delete the application, and stop Serve and the local
cluster when nothing else uses them. A signal while the application is still being deployed abandons the deployment
the same way; either is a clean stop (status 0).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from service.ray_serve.options import TARGETS_PATH, RayOptions
from service.settings import Settings

log = logging.getLogger("service.ray")

# Seconds past the service's request deadline after which Ray's proxy gives up on a request (see serve.start below).
PROXY_TIMEOUT_MARGIN_S = 5.0


def serve_on_ray(settings: Settings, options: RayOptions) -> int:
    """Run until a signal; 0 after a clean stop, 2 when the application cannot be deployed."""
    if not Path(settings.model).is_dir():
        if options.address is None and not os.environ.get("RAY_ADDRESS"):
            log.error("model folder %s does not exist (pass --model PATH or set UFB_MODEL)", settings.model)
            return 2
        log.warning("model folder %s is not on this machine; it must exist on every node", settings.model)

    import ray
    from ray import serve

    from service.ray_serve.deployment import build_app
    from service.ray_serve.proxy import CALLBACK, CALLBACK_ENV

    # a local cluster started here inherits this, so its proxies answer a dead replica's requests with JSON 502
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    # Serve gives a new proxy 3 readiness checks of 5 s; on a busy 2-core machine its start-up took longer and
    # `serve.start` failed (seen in the test suite while a distillation ran). A local cluster inherits this.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if not ray.is_initialized():
        ray.init(address=options.address, namespace="ultrafastbert")
    # ray.init installs a SIGTERM handler that exits with status 15 wherever the main thread is; from here on ours
    # decides: a signal during the deployment aborts it, a later one ends the wait below; both stop cleanly.
    stop = threading.Event()
    deploying = True

    def on_signal(signum: int, _frame: Any) -> None:
        first = not stop.is_set()
        stop.set()
        if deploying and first:
            raise _StopRequested(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    log.info("Ray cluster at %s", ray.get_runtime_context().gcs_address)
    args: dict[str, Any] = {**settings.model_dump(exclude_defaults=True), **options.model_dump(exclude_defaults=True)}
    if settings.api_key is not None:
        args["api_key"] = settings.api_key.get_secret_value()
    grace_s = settings.shutdown_grace_s + settings.shutdown_delay_s + 30.0
    try:
        # A request Ray's router sends to a replica that was just killed, before it learns of the death, can wait
        # with no end (seen in our replica-kill test: 1 request in ~5 runs hung past the client's 30 s). The proxy's
        # timeout bounds that wait: past the service's own deadline (a live replica has answered 504 by then) plus a
        # margin, the proxy answers 408.
        serve.start(
            http_options={
                "host": settings.host,
                "port": settings.port,
                "request_timeout_s": settings.request_timeout_s + PROXY_TIMEOUT_MARGIN_S,
                # the proxies hold the clients' connections: the same keep-alive rule as one process (docs/overload.md)
                "keep_alive_timeout_s": settings.keep_alive_timeout_s,
            }
        )
        try:
            serve.run(build_app(args), name=options.app_name, route_prefix="/")
        except Exception as exc:  # noqa: BLE001 - one line, not Ray's nested traceback
            log.error("the application could not be deployed: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
            _stop(options.app_name)
            return 2
        deploying = False
    except _StopRequested as exc:
        log.info("%s during the deployment: stopping (deleting application %s)", exc, options.app_name)
        _stop(options.app_name, grace_s)
        log.info("stopped cleanly")
        return 0
    url = f"http://{settings.host}:{settings.port}"
    scale = (
        f"{options.min_replicas or 1}..{options.max_replicas or options.replicas} replicas (autoscaling)"
        if options.autoscaling
        else f"{options.replicas} replica(s)"
    )
    log.info(
        "serving on Ray: %s, %s x %g CPU; Prometheus targets: %s%s",
        url,
        scale,
        options.cpus_per_replica,
        url,
        TARGETS_PATH,
    )

    stop.wait()
    log.info("stopping: deleting application %s (replicas drain their admitted work)", options.app_name)
    _stop(options.app_name, grace_s)
    log.info("stopped cleanly")
    return 0


class _StopRequested(BaseException):
    """SIGINT or SIGTERM while the application was being deployed (a BaseException, like KeyboardInterrupt, so that
    Ray's own ``except Exception`` blocks let it through)."""


def _stop(app_name: str, timeout_s: float = 60.0) -> None:
    """Delete the application (its replicas drain), stop Serve if nothing else runs on it, disconnect.

    Bounded: when the cluster is already gone (its processes were signalled too), ``serve.delete`` would wait for
    ever; after ``timeout_s`` this gives up on it and still disconnects.
    """
    import ray
    from ray import serve

    def delete() -> None:
        try:
            serve.delete(app_name)
            if not serve.status().applications:  # nobody else's applications: stop the proxies and controller too
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - e.g. stopped before Serve had started: nothing to delete
            log.warning("could not delete application %s: %s: %s", app_name, type(exc).__name__, exc)

    worker = threading.Thread(target=delete, name="ufb-serve-delete", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("Ray did not confirm the deletion within %.0fs (is the cluster still up?)", timeout_s)
    ray.shutdown()  # disconnects; also stops the cluster when this process started it
