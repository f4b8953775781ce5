"""The service on Ray Serve without a cluster (``service/ray_serve/``, ``docker/ray/``): the single-process service
never imports ray; Ray options become the right deployment options; ``build_app`` routes arguments and refuses
unknown ones; the CLI flags; the deploy config, the KubeRay manifest and the Prometheus config agree; discovery drops
stale and dead entries; the proxy middleware. tests/test_ray.py runs the service on a local cluster.

Skipped when ray is not installed (``make test`` installs the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")


from service.ray_serve import discovery  # noqa: E402
from service.ray_serve.launch import PROXY_TIMEOUT_MARGIN_S  # noqa: E402
from service.ray_serve.options import DEPLOYMENT_NAME, TARGETS_PATH, RayOptions  # noqa: E402
from service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAY_DIR = ROOT / "docker" / "ray"


# ------------------------------------------------------------------------------------------------ no cluster


def test_single_process_service_does_not_import_ray() -> None:
    code = (
        "import sys, service.app, service.cli, service.ray_serve.options\n"
        "service.cli.build_parser().parse_args(['serve', '--ray-replicas', '2'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the single-process service imported ray: {out.stdout[:300]}"


def test_options_become_deployment_options() -> None:
    fixed = RayOptions(_env_file=None, replicas=3, cpus_per_replica=2)  # type: ignore[call-arg]
    opts = fixed.deployment_options(shutdown_s=30)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2.0}
    assert opts["max_ongoing_requests"] == 64 and opts["graceful_shutdown_timeout_s"] == 35.0
    auto = RayOptions(_env_file=None, replicas=2, max_replicas=6, target_ongoing_requests=8)  # type: ignore[call-arg]
    assert auto.deployment_options()["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "initial_replicas": 2,
        "target_ongoing_requests": 8.0,
    }
    assert "num_replicas" not in auto.deployment_options()
    for bad in ({"min_replicas": 3, "max_replicas": 2}, {"replicas": 5, "max_replicas": 4}, {"replicas": 0}):
        with pytest.raises(ValueError):
            RayOptions(_env_file=None, **bad)  # type: ignore[arg-type]


def test_build_app_routes_arguments_and_refuses_unknown_ones(tmp_path: Path) -> None:
    from service.ray_serve.deployment import build_app

    app = build_app(
        {
            "model": str(tmp_path),
            "max_batch_tokens": 1024,
            "api_key": "k",
            "replicas": 2,
            "cpus_per_replica": 0.5,
            "metrics_port": 9100,
        }
    )
    deployment = app._bound_deployment  # the public API has no getter for a bound deployment
    assert deployment.name == DEPLOYMENT_NAME and deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    settings, options = deployment.init_args
    assert settings == {"model": str(tmp_path), "max_batch_tokens": 1024, "api_key": "k"}  # non-defaults only
    assert options["metrics_port"] == 9100 and options["replicas"] == 2
    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"max_batch_tokenz": 1})
    with pytest.raises(ValueError):
        build_app({"max_batch_tokens": 0})  # validated where the app is built, not in every replica
    relative = build_app({"model": "models/x"})._bound_deployment.init_args[0]["model"]
    assert Path(relative).is_absolute()  # replicas run elsewhere: paths travel absolute


def test_cli_serve_ray_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.logs
    import service.ray_serve.launch as launch
    from service.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(launch, "serve_on_ray", lambda settings, options: seen.update(s=settings, o=options) or 0)
    monkeypatch.setattr(service.logs, "setup_logging", lambda *a: None)  # leave pytest's logging alone
    for var in [v for v in os.environ if v.startswith("UFB_")]:
        monkeypatch.delenv(var)
    assert (
        main(
            [
                "serve",
                "--ray",
                "--ray-replicas",
                "2",
                "--ray-cpus-per-replica",
                "0.5",
                "--ray-max-replicas",
                "4",
                "--max-batch-tokens",
                "2048",
                "--port",
                "8123",
            ]
        )
        == 0
    )
    assert seen["s"].max_batch_tokens == 2048 and seen["s"].port == 8123
    assert seen["o"].replicas == 2 and seen["o"].cpus_per_replica == 0.5 and seen["o"].max_replicas == 4
    monkeypatch.setenv("UFB_RAY_METRICS_PORT", "9300")  # every --ray-* flag has its UFB_RAY_* twin
    monkeypatch.setenv("UFB_RAY", "1")
    assert main(["serve"]) == 0 and seen["o"].metrics_port == 9300
    monkeypatch.delenv("UFB_RAY")
    assert main(["serve", "--ray-replicas", "2"]) == 2  # --ray-* without --ray is a mistake, said so
    assert main(["serve", "--ray", "--ray-min-replicas", "3", "--ray-max-replicas", "2"]) == 2


def test_cli_serve_names_the_bad_setting_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main

    for var in [v for v in os.environ if v.startswith("UFB_")]:
        monkeypatch.delenv(var)
    assert main(["serve", "--max-batch-tokens", "0"]) == 2
    assert main(["serve", "--ray", "--ray-replicas", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("ultrafastbert serve: invalid settings: max_batch_tokens: "), lines
    assert lines[1].startswith("ultrafastbert serve: invalid Ray options: replicas: "), lines


def test_cli_serve_ray_with_a_missing_model_fails_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UFB_", "RAY_ADDRESS"))}
    out = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--ray", "--model", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0], lines


def test_serve_config_is_valid_and_equals_the_rayservice_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.ray_serve.deployment import build_app

    config = yaml.safe_load((RAY_DIR / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "service.ray_serve.deployment:build_app" and app.route_prefix == "/"
    (dep,) = app.deployments
    assert dep.name == DEPLOYMENT_NAME
    auto = dep.autoscaling_config
    assert {"min_replicas", "max_replicas", "target_ongoing_requests", "initial_replicas"} <= set(auto)
    assert auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
    assert dep.ray_actor_options.num_cpus >= 1
    assert dep.graceful_shutdown_timeout_s >= 30 + 5  # the service's own grace (30 s) plus a margin
    # the proxy's bound, as `serve --ray` sets it: the replicas' deadline plus the margin
    deadline = app.args.get("request_timeout_s", Settings.model_fields["request_timeout_s"].default)
    assert schema.http_options.request_timeout_s == deadline + PROXY_TIMEOUT_MARGIN_S
    keep_alive = app.args.get("keep_alive_timeout_s", Settings.model_fields["keep_alive_timeout_s"].default)
    assert schema.http_options.keep_alive_timeout_s == keep_alive
    build_app(app.args)  # the arguments are ones build_app accepts

    manifest = yaml.safe_load((RAY_DIR / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == config, "rayservice.yaml drifted from serve-config"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in pods:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "service.ray_serve.proxy:middlewares"
        assert container["image"].startswith("ultrafastbert-serve-ray:")
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+?)-", (RAY_DIR / "Dockerfile").read_text(), re.M)
    assert ray_image and ray_image.group(1) == cluster["rayVersion"]


def test_ray_dockerfile_copies_only_what_its_dockerignore_lets_through() -> None:
    text = (RAY_DIR / "Dockerfile").read_text()
    ignore = (RAY_DIR / "Dockerfile.dockerignore").read_text()
    assert "requirements.lock" in text and "--no-build-isolation" in text and "TORCH_VERSION=2.13.0" in text
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve.proxy:middlewares" in text
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+?)/? ", text, re.M):
        if "$" not in src:
            assert f"!{src}" in ignore or f"!{src.rstrip('/')}/**" in ignore, f"{src} is excluded from the context"


def test_prometheus_config_discovers_replicas_over_http() -> None:
    cfg = yaml.safe_load((RAY_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ufb")  # the dashboard's job label
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith(TARGETS_PATH)
    assert "static_configs" not in job


class FakeKV:
    """``ray.experimental.internal_kv``'s four calls over a dict."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}

    def _internal_kv_put(self, key: bytes, value: bytes, overwrite: bool = True, namespace: str = "") -> None:
        self.data[(namespace, key)] = value

    def _internal_kv_get(self, key: bytes, namespace: str = "") -> bytes | None:
        return self.data.get((namespace, key))

    def _internal_kv_del(self, key: bytes, namespace: str = "") -> None:
        self.data.pop((namespace, key), None)

    def _internal_kv_list(self, prefix: bytes, namespace: str = "") -> list[bytes]:
        return [k for ns, k in self.data if ns == namespace and k.startswith(prefix)]


def test_discovery_lists_live_replicas_and_drops_stale_or_dead_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = FakeKV()
    monkeypatch.setattr(discovery, "_kv", lambda: kv)
    regs = [
        discovery.Registration(
            "app",
            r,
            f"SERVE_REPLICA::app#D#{r}",
            f"10.0.0.{i}:9100",
            {"replica": r, "deployment": "D", "application": "app"},
            period_s=60,
        )
        for i, r in enumerate(["a", "b", "c"])
    ]
    for reg in regs:
        reg.start()
    other = discovery.Registration("other", "z", "x", "10.9.9.9:1", {}, 60)
    other.start()  # another application: not listed
    alive = {"SERVE_REPLICA::app#D#a": True, "SERVE_REPLICA::app#D#b": None, "SERVE_REPLICA::app#D#c": False}
    groups = discovery.live_targets("app", alive=alive.get)
    assert groups == [
        {"targets": ["10.0.0.0:9100"], "labels": {"replica": "a", "deployment": "D", "application": "app"}},
        {"targets": ["10.0.0.1:9100"], "labels": {"replica": "b", "deployment": "D", "application": "app"}},
    ]
    assert discovery._key("app", "c") not in {k for _, k in kv.data}  # the dead one's entry is deleted
    later = time.time() + 3 * 60 + 1  # past the TTL (3 heartbeats): gone even if Ray cannot tell
    assert discovery.live_targets("app", now=lambda: later, alive=lambda _: None) == []
    regs[0].start()
    regs[0].stop()  # a clean stop deletes the entry at once
    assert discovery.live_targets("app", alive=lambda _: True) == []
    for reg in [*regs, other]:
        reg.stop()


def test_metrics_server_serves_a_registry_with_an_optional_key() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("ufb_probe", "x", registry=registry).inc()
    open_server = discovery.MetricsServer(registry, "127.0.0.1", 0)
    keyed = discovery.MetricsServer(registry, "127.0.0.1", open_server.port)  # next free port after a taken one
    keyed.stop()
    keyed = discovery.MetricsServer(registry, "127.0.0.1", 0, api_key="s3cret")
    try:
        assert "ufb_probe_total 1.0" in httpx.get(f"http://{open_server.address}/metrics", timeout=5).text
        assert httpx.get(f"http://{keyed.address}/metrics", timeout=5).status_code == 401
        ok = httpx.get(f"http://{keyed.address}/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert ok.status_code == 200 and "ufb_probe_total" in ok.text
    finally:
        open_server.stop()
        keyed.stop()


def test_proxy_middleware_answers_json_502_only_when_nothing_was_sent() -> None:
    from service.ray_serve.proxy import ReplicaFailed, middlewares

    assert middlewares()[0].cls is ReplicaFailed

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Ray's proxy does when the replica died

    async def raising(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("actor died")

    async def answering(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(app: Any) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/embed", "headers": [(b"x-request-id", b"r1")]}
        await ReplicaFailed(app)(scope, None, send)
        return sent

    for app in (silent, raising):
        start, body = asyncio.run(call(app))
        headers = dict(start["headers"])
        assert start["status"] == 502 and headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"r1"
        assert json.loads(body["body"])["error_type"] == "replica_failed"
    assert [m.get("status") for m in asyncio.run(call(answering))] == [200, None]
