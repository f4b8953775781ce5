"""Per-replica Prometheus endpoints, and how Prometheus finds them: a registry in Ray's GCS.

Why not the ingress's ``/metrics``: Ray's HTTP proxy sends each request to *one* replica, so a scrape of
``/metrics`` through it returns a random replica's counters and the series jump between replicas. Instead each
replica serves its own registry on its own port (:class:`MetricsServer`, on the node's Ray address) and keeps an
entry ``{target: "ip:port", labels: {replica, deployment, application}}`` fresh in Ray's internal key-value store
(the GCS, which every node already talks to, survives with the cluster, and needs no extra actor). Any replica
answers ``GET /ray/targets`` with the live entries in Prometheus' ``http_sd_configs`` format, so one stable URL (the
Serve HTTP address) discovers every replica on every node.

Stale entries go away two ways: a replica that stops cleanly deletes its entry; one that dies (killed, node
lost) stops renewing it and is dropped once it is older than its own TTL (3 heartbeats), or at once when Ray no
longer knows its actor.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger("service.ray")

KV_NAMESPACE = "ufb"
KV_PREFIX = "metrics-targets/"
SERVE_NAMESPACE = "serve"  # where Ray Serve names its replica actors
PORT_TRIES = 64  # with a fixed --ray-metrics-port, replicas on one node take the next free ports


# ------------------------------------------------------------------------------------------ the endpoint


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape would drown the replica log


def _bearer(app: Callable[..., Any], key: str) -> Callable[..., Any]:
    """Require ``Authorization: Bearer <key>`` (constant-time), like the service's ``UFB_METRICS_REQUIRE_KEY``."""
    expected = key.encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):
            return app(environ, start_response)  # type: ignore[no-any-return]
        body = json.dumps({"error": "missing or invalid API key", "error_type": "unauthorized"}).encode()
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer")])
        return [body]

    return guarded


class MetricsServer:
    """A registry's exposition on ``host:port`` in a daemon thread (``port`` 0: any free port; otherwise the first
    free one of ``port .. port + 63``, so several replicas on one node can share a configured base port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int = 0, api_key: str | None = None) -> None:
        app = make_wsgi_app(registry)
        if api_key:
            app = _bearer(app, api_key)
        last: OSError | None = None
        for candidate in [0] if port == 0 else range(port, min(port + PORT_TRIES, 65536)):
            try:
                self._server = make_server(host, candidate, app, _ThreadingWSGIServer, _QuietHandler)
                break
            except OSError as exc:
                last = exc
        else:
            raise OSError(f"no free port for the replica's /metrics on {host} from {port}: {last}")
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ufb-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ------------------------------------------------------------------------------------------ the registry


def _kv() -> Any:
    # Ray's internal KV: the same store Serve keeps its own state in; works from any worker on any node
    from ray.experimental import internal_kv

    return internal_kv


def _key(app_name: str, replica: str) -> bytes:
    return f"{KV_PREFIX}{app_name}/{replica}".encode()


def node_address() -> str:
    """This node's address as Ray knows it (what other nodes, and so Prometheus, use to reach it).

    ``ray.util.get_node_ip_address()`` guesses from the routing table instead, which differs when a node was
    started with an explicit ``--node-ip-address`` (a loopback test cluster, a multi-homed host).
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


def actor_alive(name: str) -> bool | None:
    """True/False whether Ray still has the named Serve replica actor; None when that cannot be told."""
    import ray

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False  # a replica that died is unregistered at once; its name no longer resolves
    except Exception:  # noqa: BLE001 - a GCS hiccup must not drop live targets; the TTL still applies
        return None
    return True


class Registration:
    """One replica's discovery entry: written at once, renewed every ``period_s``, deleted on :meth:`stop`."""

    def __init__(
        self, app_name: str, replica: str, actor_name: str, address: str, labels: dict[str, str], period_s: float
    ) -> None:
        self.key = _key(app_name, replica)
        self.period_s = period_s
        self._entry = {"target": address, "labels": labels, "actor": actor_name, "ttl_s": 3 * period_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self) -> None:
        value = json.dumps({**self._entry, "ts": time.time()}).encode()
        _kv()._internal_kv_put(self.key, value, overwrite=True, namespace=KV_NAMESPACE)

    def start(self) -> None:
        self._put()  # listed from the moment the replica is ready, not one period later
        self._thread = threading.Thread(target=self._renew, name="ufb-discovery", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._put()
            except Exception as exc:  # noqa: BLE001 - keep trying; the entry expires if this persists
                log.warning("could not renew the metrics discovery entry: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            _kv()._internal_kv_del(self.key, namespace=KV_NAMESPACE)
        except Exception as exc:  # noqa: BLE001 - the TTL removes it anyway
            log.warning("could not remove the metrics discovery entry: %s", exc)


def live_targets(
    app_name: str, *, now: Callable[[], float] = time.time, alive: Callable[[str], bool | None] = actor_alive
) -> list[dict[str, Any]]:
    """The live replicas of ``app_name`` as Prometheus ``http_sd_configs`` groups, one per replica, sorted.

    Entries past their TTL, or whose actor Ray reports dead, are deleted here (any reader cleans up).
    """
    kv = _kv()
    prefix = _key(app_name, "")
    groups = []
    for key in kv._internal_kv_list(prefix, namespace=KV_NAMESPACE):
        raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        try:
            entry = json.loads(raw)
            stale = now() - float(entry["ts"]) > float(entry["ttl_s"]) or alive(str(entry["actor"])) is False
            group = {"targets": [str(entry["target"])], "labels": {str(k): str(v) for k, v in entry["labels"].items()}}
        except (TypeError, ValueError, KeyError):  # unreadable, or deleted meanwhile (raw None)
            stale, group = raw is not None, None
        if stale:
            kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        elif group is not None:
            groups.append(group)
    return sorted(groups, key=lambda g: g["targets"][0])
