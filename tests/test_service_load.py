"""The HTTP service in-process under load and faults: overload (429), deadlines (504), failing batches, client
disconnects, draining, the kernel fallback, compute dtypes and several inference workers."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from service_support import (
    make_app,
    metric,
    metric_samples,
    reference_embedding,
    run,
    running,
    settings,
    tiny_loaded,  # noqa: F401  (a fixture)
)

# ---------------------------------------------------------------------------------------------- load control


def _gate_backend(app):
    """Hold the worker inside its next forward pass until the returned event is set."""
    state = app.state.service
    gate, entered, seen = threading.Event(), threading.Event(), []
    original = state.backend.forward

    def forward(task, ids, record):
        seen.append([list(x) for x in ids])
        entered.set()
        gate.wait(10)
        return original(task, ids, record)

    state.backend.forward = forward
    return gate, entered, seen


def test_overload_gives_429_with_retry_after(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_queued_inputs=3)

    async def main():
        async with running(app) as c:
            gate, entered, _ = _gate_backend(app)
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(entered.wait, 10)
            queued = asyncio.ensure_future(c.post("/embed", json={"inputs": ["a", "b", "c"]}))
            while app.state.service.batcher.queue_depth < 3:
                await asyncio.sleep(0.005)
            r = await c.post("/embed", json={"inputs": "one too many"})
            assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
            assert int(r.headers["retry-after"]) >= 1
            gate.set()
            assert (await first).status_code == 200 and (await queued).status_code == 200
            assert (await c.post("/embed", json={"inputs": "recovered"})).status_code == 200

    run(main())


def test_deadline_gives_504_without_compute(tiny_loaded) -> None:
    app = make_app(tiny_loaded, request_timeout_s=1.0)

    async def main():
        async with running(app) as c:
            gate, entered, seen = _gate_backend(app)
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(entered.wait, 10)
            r = await c.post("/embed", json={"inputs": "zebra zebra zebra"})
            assert r.status_code == 504 and r.json()["error_type"] == "timeout"
            gate.set()
            await first
            return seen

    seen = run(main())
    zebra = tiny_loaded.tokenizer.encode(["zebra"], max_length=10, truncate=False)[0][1]
    assert not any(zebra in seq for batch in seen for seq in batch)


def test_failing_batch_is_500_and_worker_keeps_serving(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            state = app.state.service
            original = state.backend.forward
            calls = {"n": 0}

            def flaky(task, ids, record):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("simulated kernel fault")
                return original(task, ids, record)

            state.backend.forward = flaky
            r = await c.post("/embed", json={"inputs": "unlucky"})
            assert r.status_code == 500 and r.json()["error_type"] == "Backend"
            assert "simulated kernel fault" in r.json()["error"]
            assert (await c.post("/embed", json={"inputs": "lucky"})).status_code == 200
            samples = metric_samples((await c.get("/metrics")).text)
            assert metric(samples, "ufb_batch_failures_total", task="embed") == 1
            assert metric(samples, "ufb_failures_total", cause="backend") == 1

    run(main())


def test_client_disconnect_withdraws_queued_work(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            gate, entered, seen = _gate_backend(app)
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(entered.wait, 10)

            gone = asyncio.Event()
            messages = [
                {"type": "http.request", "body": json.dumps({"inputs": "zebra zebra"}).encode(), "more_body": False}
            ]

            async def receive():
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            sent = []

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/embed",
                "raw_path": b"/embed",
                "root_path": "",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
                "client": ("127.0.0.1", 1),
                "server": ("t", 80),
            }
            call = asyncio.ensure_future(app(scope, receive, send))
            batcher = app.state.service.batcher
            while batcher.queue_depth == 0:
                await asyncio.sleep(0.005)
            gone.set()
            await asyncio.wait_for(call, 5)
            assert batcher.queue_depth == 0 and batcher.queued_tokens == 0
            gate.set()
            assert (await first).status_code == 200
            samples = metric_samples((await c.get("/metrics")).text)
            assert metric(samples, "ufb_failures_total", cause="client_disconnected") == 1
            return seen

    seen = run(main())
    zebra = tiny_loaded.tokenizer.encode(["zebra"], max_length=10, truncate=False)[0][1]
    assert not any(zebra in seq for batch in seen for seq in batch)


def test_shutdown_drains_admitted_work(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            gate, entered, _ = _gate_backend(app)
            first = asyncio.ensure_future(c.post("/embed", json={"inputs": "first"}))
            assert await asyncio.to_thread(entered.wait, 10)
            second = asyncio.ensure_future(c.post("/embed", json={"inputs": "second"}))
            while app.state.service.batcher.queue_depth == 0:
                await asyncio.sleep(0.005)
            app.state.service.begin_shutdown()
            assert (await c.get("/ready")).status_code == 503
            assert (await c.post("/embed", json={"inputs": "late"})).status_code == 503
            gate.set()
            assert (await first).status_code == 200 and (await second).status_code == 200

    run(main())


def test_internal_error_is_a_json_500(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:

            def broken(n_tokens):
                raise RuntimeError("a bug, not the client's fault")

            app.state.service.neurons_for = broken
            r = await c.post("/embed", json={"inputs": "a"})
            assert r.status_code == 500 and r.json() == {"error": "internal error", "error_type": "internal"}
            del app.state.service.neurons_for
            assert (await c.post("/embed", json={"inputs": "a"})).status_code == 200

    run(main())


def test_cli_refuses_a_missing_model_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--model", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "nope"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_kernel_fallback_is_loud(tiny_loaded, monkeypatch, caplog) -> None:
    from engine.cmm import KernelInfo

    fallback = KernelInfo(False, "reference", "the extension failed to load (test)")
    monkeypatch.setattr("service.state.kernel_info", lambda: fallback)
    monkeypatch.setattr("service.info.kernel_info", lambda: fallback)
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            info = (await c.get("/info")).json()
            assert info["kernel"]["compiled"] is False and "SLOW" in info["kernel"]["warning"]
            samples = metric_samples((await c.get("/metrics")).text)
            assert metric(samples, "ufb_cmm_kernel_compiled") == 0

    with caplog.at_level("WARNING", logger="service"):
        run(main())
    assert any("REFERENCE" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_compute_dtype_bfloat16_serves_close_to_float32(tiny_loaded, monkeypatch, caplog) -> None:
    """The opt-in bf16 path really runs in bf16 (results differ from fp32), stays close, and says so in /info."""
    texts = ["the quick brown fox", "a b c d e f g h i j k l m n o p", "x"]

    async def embeddings(app):
        async with running(app) as c:
            info = (await c.get("/info")).json()
            r = await c.post("/embed", json={"inputs": texts})
            assert r.status_code == 200
            return info["model"]["compute_dtype"], torch.tensor(r.json())

    dtype32, fp32 = run(embeddings(make_app(tiny_loaded)))
    monkeypatch.setattr("service.state.is_native", lambda *_: False)
    with caplog.at_level("WARNING", logger="service"):
        dtype16, bf16 = run(embeddings(make_app(tiny_loaded, compute_dtype="bfloat16")))
    assert (dtype32, dtype16) == ("float32", "bfloat16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    cos = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    assert not torch.equal(bf16, fp32) and float(cos.min()) > 0.99, cos
    assert any("bfloat16" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    with pytest.raises(ValueError):
        settings(tiny_loaded.path, compute_dtype="float16")


def test_model_backend_refuses_an_unsupported_compute_dtype(tiny_loaded) -> None:
    from engine.backend import ModelBackend

    with pytest.raises(ValueError, match="compute_dtype"):
        ModelBackend(tiny_loaded, compute_dtype=torch.float16)


def test_two_inference_workers_serve_correct_results_and_show_in_info(tiny_loaded) -> None:
    app = make_app(tiny_loaded, inference_workers=2, torch_threads=1)
    texts = [f"sentence number {i} " * (1 + i % 5) for i in range(20)]
    threads_before = torch.get_num_threads()

    async def main():
        async with running(app) as c:
            info = (await c.get("/info")).json()
            assert info["inference"] == {"workers": 2, "torch_threads_per_worker": 1}
            rs = await asyncio.gather(*(c.post("/embed", json={"inputs": t}) for t in texts))
            for t, r in zip(texts, rs):
                assert r.status_code == 200
                torch.testing.assert_close(
                    torch.tensor(r.json()[0]), reference_embedding(tiny_loaded, t), atol=1e-5, rtol=1e-5
                )

    try:
        run(main())
    finally:
        torch.set_num_threads(threads_before)
