"""The service on Ray Serve (``service/ray_serve/``, ``docker/ray/``), tested on one machine.

On a local cluster (tests/test_ray_config.py has the tests that need none): ``ultrafastbert serve --ray`` (the real
command, default model, 2 replicas) starts a local Ray instance; this process joins it as a second driver. Two
replicas answer concurrent requests exactly like the single-process service; requests spread over both; every
``ufb_`` metric is on every replica's own endpoint and the real Prometheus finds both replicas through
``/ray/targets`` and evaluates every dashboard expression; a replica killed under load is replaced, only requests
that were in flight fail (JSON 502), none hangs; SIGTERM stops everything with exit status 0, also while the
replicas are still starting.

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

from service.ray_serve.launch import PROXY_TIMEOUT_MARGIN_S  # noqa: E402
from service.ray_serve.options import DEPLOYMENT_NAME, REPLICA_HEADER, TARGETS_PATH  # noqa: E402
from service.settings import DEFAULT_MODEL_PATH  # noqa: E402

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


def _serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UFB_", "RAY_"))}
    # token auth off for this throw-away cluster: the joining driver then needs no token file in $HOME
    env.update(
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false"
    )
    return env


def _serve_command(port: int, replicas: int) -> list[str]:
    """``serve --ray`` on a new local Ray instance."""
    return [
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
        str(replicas),
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


def _wait_for_line(
    proc: subprocess.Popen, log_path: Path, text: str, timeout_s: float = 180, poll_s: float = 0.5
) -> None:
    """Until ``serve --ray`` has logged ``text``; fails if it exits first or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, f"serve --ray exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s} s:\n{log_path.read_text()[-4000:]}"
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayService]:
    """``ultrafastbert serve --ray`` with 2 replicas of the default model on a new local Ray instance; this test
    process joins the cluster as a driver (to kill a replica and read Serve's status)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray") / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _serve_command(port, REPLICAS), cwd=ROOT, env=_serve_env(), stdout=log, stderr=subprocess.STDOUT
        )
    service = RayService(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _wait_for_line(proc, log_path, "serving on Ray")
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
    cfg["rule_files"] = [str((RAY_DIR / f).resolve()) for f in cfg["rule_files"]]  # the config moves to tmp_path
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
        groups = httpx.get(base + "/api/v1/rules", timeout=5).json()["data"]["groups"]  # the TEI recording rules
        rules = [r for g in groups for r in g["rules"]]
        assert rules and all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        tei = httpx.get(base + "/api/v1/query", params={"query": "sum(te_request_count)"}, timeout=5).json()
        assert tei["data"]["result"] and float(tei["data"]["result"][0]["value"][1]) > 0, tei


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
            # Ray's router sent it to the dying replica before it learned of the death (a race in Ray, seen in ~1
            # of 5 runs; the request may leave the client a few ms before the kill and reach the actor after it): it
            # must have started around the kill and been cut off by the proxy's timeout, not hung
            assert -1.0 <= start - t_kill <= 1.0 and end - start >= proxy_timeout - 0.5, (start - t_kill, end - start)
            continue
        # otherwise only requests that were in flight when the replica died fail, with the service's JSON 502
        assert start <= t_kill <= end + 0.5, (start - t_kill, end - t_kill, status, body)
        assert status == 502 and json.loads(body)["error_type"] == "replica_failed", body
    in_flight = sum(1 for s, e, *_ in records if s <= t_kill <= e)
    assert len([r for r in errors if r[2] == 502]) <= in_flight
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


def test_sigterm_during_the_deployment_stops_cleanly(tmp_path: Path) -> None:
    """``docker stop`` or a pod's deletion while the replicas are still starting: the deployment is abandoned and the
    local cluster stopped, with status 0 (not the 15 of the SIGTERM handler ``ray.init`` installs)."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _serve_command(port, 1), cwd=ROOT, env=_serve_env(), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        # logged once the cluster is up and the service's own handlers are in place, before Serve starts
        _wait_for_line(proc, log_path, "Ray cluster at", poll_s=0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()[-4000:]
        text = log_path.read_text(errors="replace")
        assert "SIGTERM during the deployment" in text and "stopped cleanly" in text, text[-4000:]
        assert "serving on Ray" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
