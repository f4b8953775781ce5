"""A real Prometheus server for the deployment tests, and the dashboard checks run through it.

Shared by ``test_deploy.py`` (one service, static target) and ``test_ray.py`` (replicas found by http_sd): both
start Debian's ``prometheus`` binary on loopback with a config derived from the repository's, drive the same
traffic (errors first, so their series have several scrapes) and evaluate every dashboard expression.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

DASHBOARD = Path(__file__).resolve().parent.parent / "docker" / "grafana" / "dashboards" / "ultrafastbert.json"
RATE_INTERVAL = "30s"  # what the tests substitute for Grafana's $__rate_interval

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (Debian: apt-get install -y prometheus)",
)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def promql(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def free_port() -> int:
    from loadtest.servers import free_port as pick

    return pick()


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], port: int, workdir: Path) -> Iterator[str]:
    """Prometheus with ``config`` (scrape and evaluation every second) on ``port``; yields its base URL."""
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(base + "/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert prom.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "prometheus not ready in 30 s"
                time.sleep(0.2)
            yield base
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prom.kill()


def drive_dashboard_traffic(url: str, *, concurrency: int, timeout_s: float) -> None:
    """Client errors (400, 413) three times a second apart, then 6 s of closed-loop load; then the last scrapes
    land. Every dashboard panel has data afterwards."""
    from loadtest.runner import Workload, closed_loop

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as c:
            for _ in range(3):
                assert (await c.post("/embed", json={"inputs": ""})).status_code == 400
                assert (await c.post("/embed", json={"inputs": ["x"] * 100})).status_code == 413
                await asyncio.sleep(1.0)
        await closed_loop(url, Workload(), concurrency=concurrency, duration_s=6.0, warmup_s=0.0)

    asyncio.run(traffic())
    time.sleep(2.5)


def dashboard_failures(base: str) -> list[str]:
    """Every dashboard expression evaluated by Prometheus; one line per expression without (non-NaN) data."""
    failures = []
    for expr in dashboard_exprs():
        r = httpx.get(base + "/api/v1/query", params={"query": promql(expr)}, timeout=10)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            failures.append(f"{expr}: {body.get('error', r.text[:200])}")
            continue
        values = [float(s["value"][1]) for s in body["data"]["result"]]
        if not values:
            failures.append(f"{expr}: no data")
        elif all(v != v for v in values):  # every value NaN
            failures.append(f"{expr}: only NaN")
    return failures
