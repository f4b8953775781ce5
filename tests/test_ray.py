"""The service on Ray Serve (``service/ray_serve/``, ``docker/ray/``), tested on one machine.

Without a cluster: the single-process service never imports ray; Ray options become the right deployment
options; ``build_app`` routes arguments and refuses unknown ones; the CLI flags; the deploy config, the KubeRay
manifest and the Prometheus config agree; discovery drops stale and dead entries; the proxy middleware.

With a cluster: ``ultrafastbert serve --ray`` (the real command, default model, 2 replicas) starts a local Ray
instance; this process joins it as a second driver. Two replicas answer concurrent requests exactly like the
single-process service; requests spread over both; every ``ufb_`` metric is on every replica's own endpoint and
the real Prometheus finds both replicas through ``/ray/targets`` and evaluates every dashboard expression; a
replica killed under load is replaced, only requests that were in flight fail (JSON 502), none hangs; SIGTERM
stops everything with exit status 0.

Skipped when ray is not installed (``make test`` installs the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")

from prometheus_support import (  # noqa: E402
    dashboard_failures,
    drive_dashboard_traffic,
    free_port,
    needs_prometheus,
    running_prometheus,
)
from service_support import make_app, metric_samples, running  # noqa: E402

from service.ray_serve import discovery  # noqa: E402
from service.ray_serve.launch import PROXY_TIMEOUT_MARGIN_S  # noqa: E402
from service.ray_serve.options import DEPLOYMENT_NAME, REPLICA_HEADER, TARGETS_PATH, RayOptions  # noqa: E402
from service.settings import DEFAULT_MODEL_PATH, Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAY_DIR = ROOT / "docker" / "ray"
APP_NAME = "ufb-test"
REPLICAS = 2
REQUEST_TIMEOUT_S = 10.0  # the service's deadline here; the proxy's is PROXY_TIMEOUT_MARGIN_S later
TEXTS = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "A moving, beautifully acted film that stays with you long after the credits.",
    "This sequel is a loud, tedious mess with nothing new to say.",
    "hello",
    "Heavy rain flooded the streets of the old town overnight, and the river rose above the old stone bridge "
    "for the first time in forty years, forcing shops along the quay to close.",
    "How do I reset my password?",
    "The algorithm computes the greatest common divisor of two integers.",
] * 3  # 24 requests, several of each length in flight at once


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
    assert '".[ray]"' in text and "--no-build-isolation" in text and "TORCH_VERSION=2.13.0" in text
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


# ------------------------------------------------------------------------------------------------ a cluster


@dataclass
class RayService:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def default_loaded() -> Any:
    """The default model in this process: the single-process service the replicas are compared with."""
    from engine.checkpoint import load_model

    return load_model(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayService]:
    """``ultrafastbert serve --ray`` with 2 replicas of the default model on a new local Ray instance; this test
    process joins the cluster as a driver (to kill a replica and read Serve's status)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UFB_", "RAY_"))}
    # token auth off for this throw-away cluster: the joining driver then needs no token file in $HOME
    env.update(
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--ray",
        "--ray-address",
        "local",
        "--port",
        str(port),
        "--ray-replicas",
        str(REPLICAS),
        "--ray-cpus-per-replica",
        "0.5",
        "--ray-app-name",
        APP_NAME,
        "--ray-metrics-host",
        "127.0.0.1",
        "--ray-heartbeat-s",
        "1",
        "--shutdown-grace-s",
        "5",
        "--request-timeout-s",
        str(REQUEST_TIMEOUT_S),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    service = RayService(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            deadline = time.monotonic() + 180
            while "serving on Ray" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, f"serve --ray exited with {proc.returncode}:\n{service.log()}"
                assert time.monotonic() < deadline, f"serve --ray not up in 180 s:\n{service.log()}"
                time.sleep(0.5)
            gcs = re.search(r"Ray cluster at (\S+)", log_path.read_text(errors="replace"))
            assert gcs, service.log()
            mp.setenv("RAY_AUTH_MODE", "disabled")
            ray.init(address=gcs.group(1), log_to_driver=False, logging_level="warning")
            yield service
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _post_all(
    client: httpx.AsyncClient, route: str, bodies: list[dict[str, Any]], concurrency: int = 8
) -> list[httpx.Response]:
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> httpx.Response:
        async with gate:
            return await client.post(route, json=body)

    return await asyncio.gather(*(one(b) for b in bodies))


async def _embed_and_classify(client: httpx.AsyncClient) -> tuple[list[httpx.Response], list[httpx.Response]]:
    embeds = await _post_all(client, "/v1/embeddings", [{"input": t, "encoding_format": "float"} for t in TEXTS])
    classes = await _post_all(client, "/classify", [{"inputs": t, "raw_scores": True} for t in TEXTS])
    return embeds, classes


def _targets(url: str) -> list[dict[str, Any]]:
    r = httpx.get(url + TARGETS_PATH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _replica_states() -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return dict(status.replica_states)


def test_two_replicas_answer_like_the_single_process_service(ray_service: RayService, default_loaded: Any) -> None:
    async def both() -> tuple[Any, Any]:
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=60) as c:
            on_ray = await _embed_and_classify(c)
        async with running(make_app(default_loaded)) as c:
            single = await _embed_and_classify(c)
        return on_ray, single

    (ray_embeds, ray_classes), (one_embeds, one_classes) = asyncio.run(both())
    replicas = set()
    for text, got, want in zip(TEXTS * 2, ray_embeds + ray_classes, one_embeds + one_classes):
        assert got.status_code == want.status_code == 200, got.text
        replicas.add(got.headers[REPLICA_HEADER])
        if "data" in want.json():
            a, b = got.json()["data"][0]["embedding"], want.json()["data"][0]["embedding"]
        else:
            a, b = [s["score"] for s in got.json()[0]], [s["score"] for s in want.json()[0]]
            assert [s["label"] for s in got.json()[0]] == [s["label"] for s in want.json()[0]], text
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0), text
    assert len(replicas) == REPLICAS, f"answers came from {replicas}"


def test_requests_spread_over_both_replicas_and_each_counts_its_own(ray_service: RayService) -> None:
    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=60) as c:
            return await _post_all(c, "/embed", [{"inputs": t} for t in TEXTS * 2], concurrency=8)

    before = {g["labels"]["replica"]: g["targets"][0] for g in _targets(ray_service.url)}
    assert len(before) == REPLICAS and len(set(before.values())) == REPLICAS
    counts = {r: metric_samples(httpx.get(f"http://{a}/metrics", timeout=10).text) for r, a in before.items()}
    responses = asyncio.run(load())
    assert all(r.status_code == 200 for r in responses)
    served: dict[str, int] = {}
    for r in responses:
        served[r.headers[REPLICA_HEADER]] = served.get(r.headers[REPLICA_HEADER], 0) + 1
    assert set(served) == set(before), served  # the header names exactly the discovered replicas
    assert min(served.values()) >= len(responses) // 8, f"one replica got almost nothing: {served}"
    for replica, address in before.items():  # each replica's own endpoint counted what it served
        after = metric_samples(httpx.get(f"http://{address}/metrics", timeout=10).text)
        key = ("ufb_requests_total", (("route", "/embed"), ("status", "200")))
        assert after.get(key, 0) - counts[replica].get(key, 0) == served[replica], replica


def test_every_ufb_metric_is_on_every_replica(ray_service: RayService, default_loaded: Any) -> None:
    async def single_process_families() -> set[str]:
        async with running(make_app(default_loaded)) as c:
            await _embed_and_classify(c)
            return _families((await c.get("/metrics")).text)

    expected = asyncio.run(single_process_families())
    assert {
        "ufb_ffn_neurons_evaluated",
        "ufb_ffn_neurons_dense",
        "ufb_fff_leaf_entropy_ratio",
        "ufb_fff_leaves_used_ratio",
        "ufb_requests",
    } <= expected
    groups = _targets(ray_service.url)
    assert len({g["labels"]["replica"] for g in groups}) == REPLICAS
    for g in groups:
        text = httpx.get(f"http://{g['targets'][0]}/metrics", timeout=10).text
        missing = expected - _families(text)
        assert not missing, f"replica {g['labels']['replica']} lacks {sorted(missing)}"


def _families(exposition: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(exposition) if f.name.startswith("ufb_")}


@needs_prometheus
def test_real_prometheus_finds_every_replica_and_evaluates_the_dashboard(
    ray_service: RayService, tmp_path: Path
) -> None:
    prom_port = free_port()
    cfg = yaml.safe_load((RAY_DIR / "prometheus.yml").read_text())
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "ufb":
            job["http_sd_configs"][0].update(url=ray_service.url + TARGETS_PATH, refresh_interval="1s")
        else:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    with running_prometheus(cfg, prom_port, tmp_path) as base:
        drive_dashboard_traffic(ray_service.url, concurrency=6, timeout_s=30)
        targets = httpx.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        ufb = [t for t in targets if t["labels"]["job"] == "ufb"]
        assert len(ufb) == REPLICAS and all(t["health"] == "up" for t in ufb), ufb
        assert len({t["labels"]["replica"] for t in ufb}) == REPLICAS
        count = httpx.get(base + "/api/v1/query", params={"query": "count by (replica) (ufb_ready)"}, timeout=5)
        assert len(count.json()["data"]["result"]) == REPLICAS
        failures = dashboard_failures(base)
        assert not failures, "\n".join(failures)


def test_the_proxy_bounds_every_request_just_past_the_service_deadline(ray_service: RayService) -> None:
    """A request that never reaches a live replica must not wait forever: Serve's proxy is started with a timeout of
    the service's deadline plus a margin (a replica that has the request answers 504 at the deadline first)."""
    from ray.serve.context import _get_global_client

    assert _get_global_client().http_config.request_timeout_s == REQUEST_TIMEOUT_S + PROXY_TIMEOUT_MARGIN_S


def test_killed_replica_is_replaced_and_only_its_requests_fail(ray_service: RayService) -> None:
    groups = _targets(ray_service.url)
    victim = groups[0]["labels"]["replica"]
    survivor = groups[1]["labels"]["replica"]
    text = " ".join(TEXTS[:6])  # long enough that several requests are on each replica at any moment
    records: list[tuple[float, float, int | str, str | None, str]] = []  # start, end, status, replica, body
    killed_at: list[float] = []

    async def load() -> None:
        stop_at = [float("inf")]

        async def user() -> None:
            async with httpx.AsyncClient(base_url=ray_service.url, timeout=30) as c:
                while time.monotonic() < stop_at[0]:
                    t0 = time.monotonic()
                    try:
                        r = await c.post("/v1/embeddings", json={"input": text})
                        records.append(
                            (t0, time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER), r.text[:300])
                        )
                    except httpx.HTTPError as exc:  # a timeout here would be a hang
                        records.append((t0, time.monotonic(), type(exc).__name__, None, str(exc)))

        async def chaos() -> None:
            await asyncio.sleep(3.0)
            handle = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve")
            killed_at.append(time.monotonic())
            ray.kill(handle, no_restart=True)
            deadline = time.monotonic() + 90
            while (await asyncio.to_thread(_replica_states)).get("RUNNING", 0) != REPLICAS or len(
                await asyncio.to_thread(_targets, ray_service.url)
            ) != REPLICAS:
                assert time.monotonic() < deadline, f"not replaced in 90 s: {_replica_states()}"
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)  # the new replica takes traffic
            stop_at[0] = time.monotonic()

        await asyncio.gather(chaos(), *(user() for _ in range(8)))

    asyncio.run(load())
    (t_kill,) = killed_at
    errors = [r for r in records if r[2] != 200]
    assert not [r for r in errors if not isinstance(r[2], int)], f"transport errors or hangs: {errors[:3]}"
    proxy_timeout = REQUEST_TIMEOUT_S + PROXY_TIMEOUT_MARGIN_S
    for start, end, status, _, body in errors:
        if status == 408:
            # Ray's router sent it to the dead replica before it learned of the death (a race in Ray, seen in ~1
            # of 5 runs): it must have started just after the kill and been cut off by the proxy's timeout, not hung
            assert 0 <= start - t_kill <= 1.0 and end - start >= proxy_timeout - 0.5, (start - t_kill, end - start)
            continue
        # otherwise only requests that were in flight when the replica died fail, with the service's JSON 502
        assert start <= t_kill <= end + 0.5, (start - t_kill, end - t_kill, status, body)
        assert status == 502 and json.loads(body)["error_type"] == "replica_failed", body
    in_flight = sum(1 for s, e, *_ in records if s <= t_kill <= e)
    assert len([r for r in errors if r[2] == 502]) <= in_flight  # a 408 (above) was not in flight at the kill
    print(f"replica killed: {len(errors)} of {in_flight} requests in flight failed, {len(records)} requests in all")
    replicas_after = {r[3] for r in records if r[0] > t_kill + 1 and r[2] == 200}
    assert victim not in replicas_after and survivor in replicas_after
    new = {g["labels"]["replica"] for g in _targets(ray_service.url)}
    assert victim not in new and survivor in new and len(new) == REPLICAS  # the dead entry is gone
    assert (new - {survivor}) <= replicas_after, "the replacement replica did not take traffic"
    assert len(records) > 20


def test_sigterm_stops_the_application_and_the_local_cluster(ray_service: RayService) -> None:
    ray.shutdown()  # this driver leaves first, so the cluster can stop
    ray_service.proc.send_signal(signal.SIGTERM)
    assert ray_service.proc.wait(90) == 0, ray_service.log()
    assert "stopped cleanly" in ray_service.log()
    with pytest.raises(httpx.HTTPError):
        httpx.get(ray_service.url + "/health", timeout=2)
