"""Shutdown of a real ``ultrafastbert serve`` process: SIGTERM drains admitted work, answers it, and exits zero."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from service_support import (
    metric,
    metric_samples,
    reference_embedding,
    tiny_loaded,  # noqa: F401  (a fixture)
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- shutdown

SITECUSTOMIZE = """
import os, time
delay = float(os.environ.get("UFB_TEST_FORWARD_DELAY_S", "0"))
if delay:
    import engine.backend as _b
    _forward = _b.ModelBackend.forward
    def forward(self, *a, **k):
        time.sleep(delay)
        return _forward(self, *a, **k)
    _b.ModelBackend.forward = forward
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_on_a_real_process_drains_and_exits_zero(tiny_model_dir, tmp_path, tiny_loaded) -> None:
    """`python -m service serve` as a child process; its forward pass is slowed to 0.4 s by a sitecustomize
    (the only test hook: everything else is the real CLI, uvicorn and signal handling)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    grace = 10.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("UFB_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]), UFB_TEST_FORWARD_DELAY_S="0.4")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--max-batch-requests",
            "1",
            "--shutdown-grace-s",
            str(grace),
            "--shutdown-delay-s",
            "1.0",
            "--log-level",
            "info",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server never became ready"
            time.sleep(0.1)

        texts = [f"in flight number {i}" for i in range(4)]
        results: dict[int, httpx.Response] = {}

        def post(i: int) -> None:
            results[i] = httpx.post(url + "/embed", json={"inputs": texts[i]}, timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()

        def all_admitted_some_pending() -> bool:
            time.sleep(0.03)
            m = metric_samples(httpx.get(url + "/metrics").text)
            pending = metric(m, "ufb_queue_depth") + metric(m, "ufb_inflight_batches")
            done = metric(m, "ufb_requests_total", route="/embed", status="200")
            return pending + done >= 4 and pending >= 2

        wait_until(all_admitted_some_pending, timeout=20, what="all four admitted, two or more still pending")
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error_type"] == "Unhealthy", ready.text
        assert "draining" in ready.json()["error"]
        refused = httpx.post(url + "/embed", json={"inputs": "new work"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error_type"] == "Unhealthy", refused.text
        for t in threads:
            t.join(30)
        for i, text in enumerate(texts):  # admitted requests were not cut off, and are right
            assert results[i].status_code == 200, results[i].text
            assert torch.allclose(
                torch.tensor(results[i].json()[0]), reference_embedding(tiny_loaded, text), atol=1e-5, rtol=0
            )
        rc = proc.wait(timeout=grace + 5)
        took = time.monotonic() - t_term
        log = proc.communicate()[0]
        assert rc == 0, log
        assert took < grace, f"exit took {took:.1f}s"
        assert "Traceback" not in log and "stopped cleanly" in log, log
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
