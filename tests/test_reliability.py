"""Reliability under the conditions real deployments meet (issue 6): overload, slow and vanishing clients,
deadlines, shutdown of a real process, faults, bad model folders, the kernel fallback, authentication.

Everything runs on the tiny random model, on loopback only, with small limits so that each test is short on a
2-core machine. Where a test needs work to be slow on purpose it wraps the backend's forward (in-process) or
delays it through a ``sitecustomize`` (real process), never by depending on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from service_support import (
    make_app,
    metric,
    metric_samples,
    reference_embedding,
    running,
    serve_in_thread,
    tiny_loaded,  # noqa: F401  (a fixture)
    wait_until,
)

from service.errors import is_openai_path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def text_of(i: int) -> str:
    n = 1 + (i * 7) % 12
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def zebra_id(loaded) -> int:
    return loaded.tokenizer.encode(["zebra"], max_length=10, truncate=False)[0][1]


class Recording:
    """Wraps the app's backend forward: records every batch's ids; optionally holds the worker (gate) or
    sleeps per batch, or raises for batches containing a token."""

    def __init__(self, app, *, delay_s: float = 0.0, fail_token: int | None = None) -> None:
        self.state = app.state.service
        self.original = self.state.backend.forward
        self.seen: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay_s = delay_s
        self.fail_token = fail_token
        self.state.backend.forward = self.forward

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def forward(self, task, ids, record):
        self.seen.append([list(x) for x in ids])
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_token is not None and any(self.fail_token in x for x in ids):
            raise RuntimeError("simulated kernel fault")
        return self.original(task, ids, record)

    def contains(self, token: int) -> int:
        """How many forward passes included ``token``."""
        return sum(any(token in seq for seq in batch) for batch in self.seen)


def assert_idle(batcher) -> None:
    """Nothing leaked: no queued input, no queued token, no admitted request, no batch in flight."""
    assert (batcher.queue_depth, batcher.queued_tokens, batcher.admitted, batcher.inflight_batches) == (0, 0, 0, 0)
    assert batcher.idle


# ---------------------------------------------------------------------------------------------- overload

BURST = 300
CAPS = dict(
    max_queued_inputs=16, max_queued_tokens=192, max_concurrent_requests=24, max_batch_requests=8, max_batch_wait_ms=2
)
# Stated bound. An admitted request waits behind at most max_queued_inputs inputs (2 batches of 8, 20 ms each
# by construction) plus its own batch, i.e. ~0.1 s of model time; the rest is the event loop parsing and
# answering all 300 requests in-process. Measured: ~1 s on an idle 2-core machine, 3.7 s worst seen with a
# distillation job and a soak sharing those 2 cores. The bound is set above that worst case; 429s stay faster.
ADMITTED_P99_BOUND_S = 6.0
REJECT_P99_BOUND_S = 3.0


def test_overload_burst_sheds_fast_bounds_the_queue_and_recovers(tiny_loaded) -> None:
    app = make_app(tiny_loaded, **CAPS)

    async def main():
        async with running(app) as c:
            batcher = app.state.service.batcher
            rec = Recording(app, delay_s=0.02)  # 20 ms per batch: the burst is far beyond capacity
            batcher.reset_peaks()

            async def one(i: int):
                texts = [text_of(i)] if i % 4 else [text_of(i), text_of(i + 50)]
                t0 = time.perf_counter()
                r = await c.post("/embed", json={"inputs": texts})
                return i, texts, r, time.perf_counter() - t0

            results = await asyncio.gather(*(one(i) for i in range(BURST)))
            peaks = batcher.peaks()
            await asyncio.sleep(0)
            idle = (batcher.queue_depth, batcher.queued_tokens, batcher.admitted, batcher.inflight_batches)
            after = await c.post("/embed", json={"inputs": "after the burst"})
            samples = metric_samples((await c.get("/metrics")).text)
            return results, peaks, idle, after, samples, rec

    results, peaks, idle, after, samples, rec = run(main())
    ok = [(i, texts, r, dt) for i, texts, r, dt in results if r.status_code == 200]
    shed = [(r, dt) for _, _, r, dt in results if r.status_code == 429]
    assert len(ok) + len(shed) == BURST, {r.status_code for _, _, r, _ in results}
    assert len(shed) >= BURST // 2, f"only {len(shed)} of {BURST} shed: the burst was not beyond capacity"
    assert len(ok) >= CAPS["max_queued_inputs"] // 2, "almost nothing was admitted"
    for r, _ in shed:
        assert r.json()["error_type"] == "Overloaded" and int(r.headers["retry-after"]) >= 1
    # admitted requests are answered correctly: equal to each input computed alone
    for _, texts, r, _ in ok:
        for text, vec in zip(texts, r.json()):
            assert torch.allclose(torch.tensor(vec), reference_embedding(tiny_loaded, text), atol=1e-5, rtol=0)
    # memory is bounded: the queue never held more than its caps, in inputs, tokens and requests
    assert peaks["queue_depth"] <= CAPS["max_queued_inputs"], peaks
    assert peaks["queued_tokens"] <= CAPS["max_queued_tokens"], peaks
    assert peaks["admitted"] <= CAPS["max_concurrent_requests"], peaks
    assert peaks["admitted"] == CAPS["max_concurrent_requests"] or peaks["queue_depth"] > 0
    # latency: admitted p99 within the stated bound, and the excess is refused fast
    p99 = sorted(dt for *_, dt in ok)[int(0.99 * (len(ok) - 1))]
    shed_p99 = sorted(dt for _, dt in shed)[int(0.99 * (len(shed) - 1))]
    assert p99 < ADMITTED_P99_BOUND_S, f"admitted p99 {p99:.3f}s"
    assert shed_p99 < REJECT_P99_BOUND_S, f"429 p99 {shed_p99:.3f}s"
    # full recovery: nothing left behind and a normal request succeeds
    assert idle == (0, 0, 0, 0)
    assert after.status_code == 200
    assert metric(samples, "ufb_failures_total", cause="overloaded") == len(shed)
    assert metric(samples, "ufb_queue_depth") == 0 and metric(samples, "ufb_queue_tokens") == 0


# ---------------------------------------------------------------------------------------------- clients


def _raw_post(url: str, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_vanishing_clients_cost_no_compute_and_leak_nothing(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_batch_requests=2, max_batch_wait_ms=0)
    zebra = zebra_id(tiny_loaded)
    with serve_in_thread(app) as url:
        batcher = app.state.service.batcher
        rec = Recording(app)

        # 1. gone while queued: its input never reaches the model
        rec.hold()
        blocker = threading.Thread(target=httpx.post, args=(url + "/embed",), kwargs={"json": {"inputs": "x"}})
        blocker.start()
        assert rec.entered.wait(10)
        s = _raw_post(url, "/embed", {"inputs": "zebra zebra"})
        wait_until(lambda: batcher.queue_depth == 1, what="the request to queue")
        s.close()
        wait_until(lambda: batcher.queue_depth == 0 and batcher.admitted == 1, what="its input to be withdrawn")
        rec.gate.set()
        blocker.join(10)
        wait_until(lambda: batcher.idle, what="idle")
        assert rec.contains(zebra) == 0

        # 2. gone during inference: the batch in flight finishes, its other inputs are never computed
        rec.hold()
        n_before = len(rec.seen)
        s = _raw_post(url, "/embed", {"inputs": [f"zebra {w}" for w in WORDS[:6]]})  # 6 inputs: 3 batches
        assert rec.entered.wait(10)
        wait_until(lambda: batcher.queue_depth == 4, what="the rest to queue")
        s.close()
        wait_until(lambda: batcher.queue_depth == 0, what="the rest to be withdrawn")
        rec.gate.set()
        wait_until(lambda: batcher.idle, what="idle")
        assert len(rec.seen) - n_before == 1 and rec.contains(zebra) == 1  # only the batch already running
        assert_idle(batcher)
        assert httpx.post(url + "/embed", json={"inputs": "still serving"}).status_code == 200
        samples = metric_samples(httpx.get(url + "/metrics").text)
        assert metric(samples, "ufb_failures_total", cause="client_disconnected") == 2


def test_slow_reader_does_not_stall_others(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_input_tokens=128, payload_limit=2_000_000)
    with serve_in_thread(app) as url:
        # a ~3 MB answer read 4 KiB at a time, 20 times a second: it would take ~40 s to read
        slow = _raw_post(url, "/tokenize", {"inputs": "word " * 40000}, rcvbuf=4096)
        slow.settimeout(10)
        first = slow.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        stop = threading.Event()

        def dribble() -> None:
            while not stop.is_set():
                try:
                    if not slow.recv(4096):
                        return
                except OSError:
                    return
                time.sleep(0.05)

        reader = threading.Thread(target=dribble, daemon=True)
        reader.start()
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as c:
            for i in range(20):
                t0 = time.perf_counter()
                r = c.post("/embed", json={"inputs": text_of(i)})
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                assert torch.allclose(
                    torch.tensor(r.json()[0]), reference_embedding(tiny_loaded, text_of(i)), atol=1e-5, rtol=0
                )
        assert reader.is_alive(), "the slow reader finished: the test did not hold a slow response open"
        assert max(latencies) < 2.0, f"others were stalled: max {max(latencies):.2f}s"
        stop.set()
        slow.close()
        reader.join(5)
        wait_until(lambda: app.state.service.batcher.idle, what="idle")
        assert_idle(app.state.service.batcher)


# ---------------------------------------------------------------------------------------------- deadlines


def test_deadline_answers_504_and_the_work_is_never_done(tiny_loaded) -> None:
    app = make_app(tiny_loaded, request_timeout_s=0.5)
    zebra = zebra_id(tiny_loaded)

    async def main():
        async with running(app) as c:
            rec = Recording(app)
            rec.hold()
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(rec.entered.wait, 10)
            t0 = time.perf_counter()
            late = await c.post("/v1/embeddings", json={"input": ["zebra", "zebra zebra"]})
            waited = time.perf_counter() - t0
            rec.gate.set()
            held = await first  # it also outlived its deadline, inside the forward pass: 504 too
            await asyncio.sleep(0.05)  # let the worker look at its queue once more
            samples = metric_samples((await c.get("/metrics")).text)
            return late, held, waited, rec, samples, app.state.service.batcher

    late, held, waited, rec, samples, batcher = run(main())
    assert late.status_code == 504 and late.headers["content-type"] == "application/json"
    assert late.json()["error"]["code"] == "timeout" and "deadline" in late.json()["error"]["message"]
    assert 0.4 <= waited < 2.0, waited
    assert rec.contains(zebra) == 0, "the model was called for a request whose deadline had passed"
    assert held.status_code == 504
    assert metric(samples, "ufb_failures_total", cause="timeout") == 2
    assert_idle(batcher)


# ---------------------------------------------------------------------------------------------- faults


def test_failing_batch_fails_only_its_requests_and_is_counted(tiny_loaded) -> None:
    zebra = zebra_id(tiny_loaded)
    app = make_app(tiny_loaded, max_batch_wait_ms=0)

    async def main():
        async with running(app) as c:
            rec = Recording(app, fail_token=zebra)
            rec.hold()
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(rec.entered.wait, 10)
            batcher = app.state.service.batcher
            a = asyncio.ensure_future(c.post("/embed", json={"inputs": "zebra one"}))
            b = asyncio.ensure_future(c.post("/embed", json={"inputs": ["two words", "three"]}))
            other = asyncio.ensure_future(c.post("/classify", json={"inputs": "another task, another batch"}))
            while batcher.queue_depth < 4:
                await asyncio.sleep(0.005)
            rec.gate.set()
            responses = [await x for x in (first, a, b, other)]
            after = await c.post("/embed", json={"inputs": "the worker is alive"})
            samples = metric_samples((await c.get("/metrics")).text)
            return responses, after, samples, batcher

    (first, a, b, other), after, samples, batcher = run(main())
    assert first.status_code == 200 and other.status_code == 200 and after.status_code == 200
    for r in (a, b):  # a and b shared the failing batch
        assert r.status_code == 500, r.text
        body = r.json()
        assert body["error_type"] == "Backend"
        assert "inference failed for the batch" in body["error"] and "simulated kernel fault" in body["error"]
    assert metric(samples, "ufb_batch_failures_total", task="embed") == 1
    assert metric(samples, "ufb_failures_total", cause="backend") == 2
    assert metric(samples, "ufb_requests_total", route="/embed", status="500") == 2
    assert_idle(batcher)


def _corrupt(base: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of a good model folder -> (folder, a word the error must contain)."""
    from engine.checkpoint import read_safetensors

    out: dict[str, tuple[Path, str]] = {"missing": (tmp / "no-such-model", "does not exist")}

    def copy(name: str) -> Path:
        dst = tmp / name
        shutil.copytree(base, dst)
        return dst

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out["truncated"] = (truncated, "truncated")

    from safetensors.torch import save_file

    shapes = copy("wrong-shapes")
    tensors = read_safetensors(shapes / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 3, tensors[name].shape[1])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shapes / "model.safetensors"))
    out["wrong-shapes"] = (shapes, "shape")

    mismatch = copy("config-mismatch")
    cfg = json.loads((mismatch / "ufb_config.json").read_text())
    cfg["num_layers"] += 1
    (mismatch / "ufb_config.json").write_text(json.dumps(cfg))
    out["config-mismatch"] = (mismatch, "does not match")
    return out


def test_cli_refuses_broken_model_folders_in_one_line(tiny_model_dir, tmp_path) -> None:
    cases = _corrupt(tiny_model_dir, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UFB_")}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--model",
                str(folder),
                "--port",
                "1",
            ],  # never bound: the start must fail before that
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (folder, _) in cases.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        folder, word = cases[name]
        lines = [ln for ln in (out + err).splitlines() if ln.strip()]
        assert proc.returncode == 2, (name, proc.returncode, err)
        assert "Traceback" not in out + err, (name, err)
        assert len(lines) == 1, (name, lines)
        assert word.lower() in lines[0].lower() and folder.name in lines[0], (name, lines[0])


def test_unbuildable_kernel_is_reported_loudly(tiny_loaded, monkeypatch, caplog) -> None:
    import engine.cmm
    from engine.cmm import KernelInfo

    broken = KernelInfo(False, "reference", "the compiled extension engine._cmm failed to load (simulated)")
    monkeypatch.setattr(engine.cmm, "KERNEL", broken)
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            info = (await c.get("/info")).json()
            samples = metric_samples((await c.get("/metrics")).text)
            ok = await c.post("/embed", json={"inputs": "still answers"})
            return info, samples, ok

    with caplog.at_level("WARNING", logger="service"):
        info, samples, ok = run(main())
    assert info["kernel"]["compiled"] is False
    assert "SLOW FALLBACK" in info["kernel"]["warning"] and "simulated" in info["kernel"]["warning"]
    assert metric(samples, "ufb_cmm_kernel_compiled") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert any("REFERENCE" in m and "simulated" in m and "slower" in m for m in warnings), warnings
    assert ok.status_code == 200  # reported, not fatal: the reference path still answers correctly


# ---------------------------------------------------------------------------------------------- auth


def test_api_key_guards_every_inference_route_and_info(tiny_loaded, monkeypatch) -> None:
    import hmac

    import service.middleware

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(service.middleware.hmac, "compare_digest", spy)
    app = make_app(tiny_loaded, api_key="k3y-0f-the-test")
    from service.routes import router

    posts = sorted({r.path for r in router.routes if "POST" in (getattr(r, "methods", None) or ())})
    assert {"/v1/embeddings", "/embeddings", "/embed", "/embed_all", "/classify", "/predict", "/tokenize"} <= set(posts)
    bodies = {"/v1/embeddings": {"input": "a"}, "/embeddings": {"input": "a"}, "/decode": {"ids": [1, 2]}}
    gets = ["/info", "/v1/models", "/models"]
    good = {"Authorization": "Bearer k3y-0f-the-test"}

    async def main():
        async with running(app) as c:
            for path in posts + gets:
                body = bodies.get(path, {"inputs": "a"})
                for headers in ({}, {"Authorization": "Bearer k3y-0f-the-tesT"}, {"Authorization": "k3y"}):
                    r = await (
                        c.get(path, headers=headers) if path in gets else c.post(path, json=body, headers=headers)
                    )
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                    if is_openai_path(path):  # OpenAI's error object on its routes
                        assert r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
                    else:
                        assert r.json()["error_type"] == "unauthorized", (path, r.text)
                r = await (c.get(path, headers=good) if path in gets else c.post(path, json=body, headers=good))
                assert r.status_code == 200, (path, r.text)
            for path in ("/health", "/ready", "/metrics"):
                assert (await c.get(path)).status_code == 200, path
            return metric_samples((await c.get("/metrics")).text), len(posts) + len(gets)

    samples, n_routes = run(main())
    assert metric(samples, "ufb_auth_failures_total", reason="missing") == n_routes
    assert metric(samples, "ufb_auth_failures_total", reason="invalid") == 2 * n_routes
    assert metric(samples, "ufb_failures_total", cause="unauthorized") == 3 * n_routes
    assert calls and all(a is bytes and b is bytes for a, b in calls)  # constant-time comparison, on bytes

    protected = make_app(tiny_loaded, api_key="k", metrics_require_key=True)

    async def metrics_too():
        async with running(protected) as c:
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
            assert (await c.get("/health")).status_code == 200 and (await c.get("/ready")).status_code == 200
            info = (await c.get("/info", headers={"Authorization": "Bearer k"})).json()
            assert info["auth"] == {"api_key_required": True, "metrics_require_key": True}

    run(metrics_too())
