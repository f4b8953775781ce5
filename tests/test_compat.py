"""TEI and OpenAI compatibility in-process (issue 25): TEI's /predict forms, POST / and /invocations, /info keys,
/ping and /health, prompt_name, both error shapes (middleware errors included), OpenAI requests of up to 2,048 inputs
sliced under the queue limits, and the small things: --log-level in any case, request_id on every log line, no
_created series unless asked, the load generator without aiohttp."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from service_support import (  # noqa: F401  (tiny_loaded is a fixture)
    make_app,
    reference_embedding,
    reference_logits,
    running,
    tiny_loaded,
)

REPO = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def probs(loaded, text: str) -> dict[str, float]:
    p = torch.softmax(reference_logits(loaded, text), -1)
    return {lab: float(p[i]) for i, lab in enumerate(loaded.config.labels)}


def ranked(loaded, text: str, scores: torch.Tensor | None = None) -> list[str]:
    values = reference_logits(loaded, text) if scores is None else scores
    return [loaded.config.labels[i] for i in torch.argsort(values, descending=True).tolist()]


# ---------------------------------------------------------------------------------------------- TEI


def test_predict_accepts_teis_three_forms_and_refuses_pairs(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            return {
                name: await c.post("/predict", json={"inputs": inputs})
                for name, inputs in [
                    ("string", "great"),
                    ("one", ["great"]),
                    ("batch", [["great"], ["awful film"]]),
                    ("pair", ["great", "awful"]),
                    ("batch_pair", [["great"], ["a", "b"]]),
                    ("three", ["a", "b", "c"]),
                    ("empty_item", [[]]),
                    ("too_long_item", [["a", "b", "c"]]),
                ]
            }

    r = run(main())
    for name in ("string", "one"):  # one input: one list of predictions, best first
        assert r[name].status_code == 200, r[name].text
        body = r[name].json()
        assert [p["label"] for p in body] == ranked(tiny_loaded, "great")
        for p in body:
            assert abs(p["score"] - probs(tiny_loaded, "great")[p["label"]]) < 1e-5
    batch = r["batch"].json()
    assert len(batch) == 2 and [p["label"] for p in batch[1]] == ranked(tiny_loaded, "awful film")
    for name in ("pair", "batch_pair"):
        assert r[name].status_code == 422 and r[name].json()["error_type"] == "Validation"
        assert "sentence pair" in r[name].json()["error"] and "single sequences" in r[name].json()["error"]
    assert "input 1" in r["batch_pair"].json()["error"]
    for name in ("three", "empty_item", "too_long_item"):
        assert r[name].status_code == 422 and r[name].json()["error_type"] == "Validation", r[name].text


def test_root_and_invocations_route_by_body(tiny_loaded) -> None:
    """POST / (and SageMaker's /invocations): TEI's embed by default, /predict for TEI's classification fields or
    a batch of lists of strings, the Inference API's text-classification shape when `parameters` is present."""
    app = make_app(tiny_loaded)
    text = "the film was great"

    async def main():
        async with running(app) as c:
            out = {}
            for path in ("/", "/invocations"):
                out[path, "embed"] = await c.post(path, json={"inputs": text})
                out[path, "embed_opts"] = await c.post(
                    path, json={"inputs": [text, "x"], "normalize": False, "truncate": True}
                )
                out[path, "predict_raw"] = await c.post(path, json={"inputs": text, "raw_scores": True})
                out[path, "predict_batch"] = await c.post(path, json={"inputs": [[text], ["x"]]})
                out[path, "hf"] = await c.post(path, json={"inputs": text, "parameters": {}})
                out[path, "hf_top1"] = await c.post(
                    path, json={"inputs": text, "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}}
                )
                out[path, "hf_bad"] = await c.post(path, json={"inputs": text, "parameters": {"top_k": 0}})
                out[path, "not_json"] = await c.post(path, content=b"{", headers={"content-type": "application/json"})
                out[path, "not_object"] = await c.post(path, json=["a"])
                out[path, "prompt"] = await c.post(path, json={"inputs": text, "prompt_name": "query"})
            return out

    out = run(main())
    logits = reference_logits(tiny_loaded, text)
    for path in ("/", "/invocations"):
        vec = out[path, "embed"].json()
        assert torch.allclose(torch.tensor(vec[0]), reference_embedding(tiny_loaded, text), atol=1e-5)
        raw = out[path, "embed_opts"].json()
        assert len(raw) == 2 and torch.allclose(
            torch.tensor(raw[1]), reference_embedding(tiny_loaded, "x", normalize=False), atol=1e-5
        )
        assert [p["score"] for p in out[path, "predict_raw"].json()] == pytest.approx(
            sorted(logits.tolist(), reverse=True), abs=1e-5
        )
        assert len(out[path, "predict_batch"].json()) == 2
        hf = out[path, "hf"].json()  # one list per input, a single string included
        assert len(hf) == 1 and [p["label"] for p in hf[0]] == ranked(tiny_loaded, text)
        assert sum(p["score"] for p in hf[0]) == pytest.approx(1.0, abs=1e-5)
        (top,) = out[path, "hf_top1"].json()[0]
        assert top["label"] == ranked(tiny_loaded, text)[0]
        assert top["score"] == pytest.approx(float(torch.sigmoid(logits.max())), abs=1e-5)
        for name in ("hf_bad", "not_json", "not_object", "prompt"):
            r = out[path, name]
            assert r.status_code == 422 and r.json()["error_type"] == "Validation", (path, name, r.text)
        assert "prompt" in out[path, "prompt"].json()["error"]


def test_info_has_teis_keys_beside_ours(tiny_loaded) -> None:
    app = make_app(tiny_loaded, served_model_name="ufb-tiny", max_inputs_per_request=16, tokenizer_workers=3)

    async def main():
        async with running(app) as c:
            return (await c.get("/info")).json()

    info = run(main())
    labels = tiny_loaded.config.labels
    assert info["model_id"] == tiny_loaded.name and info["served_model_name"] == "ufb-tiny"
    assert info["model_dtype"] == "float32" and info["model_sha"] is None
    assert info["model_type"] == {
        "embedding": {"pooling": tiny_loaded.config.pooling},
        "classifier": {
            "id2label": {str(i): lab for i, lab in enumerate(labels)},
            "label2id": {lab: i for i, lab in enumerate(labels)},
        },
    }
    assert info["max_input_length"] == 128 and info["max_client_batch_size"] == 16
    assert info["tokenization_workers"] == 3 and info["auto_truncate"] is False
    assert info["max_batch_tokens"] == info["limits"]["max_batch_tokens"]
    assert info["max_concurrent_requests"] == info["limits"]["max_concurrent_requests"]
    assert info["limits"]["max_inputs_per_openai_request"] == 2048
    assert info["version"] and info["model"]["hidden_size"] == 64  # ours, beside TEI's


def test_ping_root_health_and_prompt_name(tiny_loaded) -> None:
    app = make_app(tiny_loaded, api_key="k")

    async def main():
        async with running(app) as c:
            for path in ("/health", "/ping", "/"):  # probes need no key, as TEI's public routes
                r = await c.get(path)
                assert r.status_code == 200 and r.json() == {"status": "ok"}, path
            r = await c.post("/", json={"inputs": "a"})
            assert r.status_code == 401  # POST / is inference: the key is required
            key = {"Authorization": "Bearer k"}
            for route in ("/embed", "/embed_all", "/tokenize"):
                r = await c.post(route, json={"inputs": "a", "prompt_name": "query"}, headers=key)
                assert r.status_code == 422 and r.json()["error_type"] == "Validation", route
                assert "prompt_name" in r.json()["error"] and "'query'" in r.json()["error"]
                ok = await c.post(route, json={"inputs": "a", "prompt_name": None}, headers=key)
                assert ok.status_code == 200, route

    run(main())


# ---------------------------------------------------------------------------------------------- errors


def test_openai_routes_answer_openais_error_object_middleware_included(tiny_loaded) -> None:
    app = make_app(tiny_loaded, api_key="k", payload_limit=4096)
    key = {"Authorization": "Bearer k"}

    async def main():
        async with running(app) as c:
            return {
                "401": await c.post("/v1/embeddings", json={"input": "a"}),
                "401_models": await c.get("/models"),
                "413_payload": await c.post("/v1/embeddings", content=b" " * 5000, headers=key),
                "422_utf8": await c.post(
                    "/embeddings", content=b'{"input": "\xff"}', headers={**key, "content-type": "application/json"}
                ),
                "422_dims": await c.post("/v1/embeddings", json={"input": "a", "dimensions": 65}, headers=key),
                "422_format": await c.post(
                    "/v1/embeddings", json={"input": "a", "encoding_format": "hex"}, headers=key
                ),
                "400_empty": await c.post("/v1/embeddings", json={"input": []}, headers=key),
                "404_route": await c.get("/v1/engines", headers=key),
                "tei_401": await c.post("/embed", json={"inputs": "a"}),
                "tei_413": await c.post("/embed", content=b" " * 5000, headers=key),
                "user": await c.post("/v1/embeddings", json={"input": "a", "user": "user-42"}, headers=key),
                "nulls": await c.post(  # OpenAI's optional fields, sent as null by clients that write every field
                    "/v1/embeddings",
                    json={"input": "a", "model": None, "encoding_format": None, "dimensions": None, "user": None},
                    headers=key,
                ),
            }

    r = run(main())

    def err(name):
        body = r[name].json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return r[name].status_code, body["error"]

    status, e = err("401")
    assert status == 401 and e["type"] == "invalid_request_error" and e["code"] == "invalid_api_key"
    assert err("401_models")[0] == 401
    status, e = err("413_payload")
    assert status == 413 and e["code"] == "payload_too_large" and "4096" in e["message"]
    assert err("422_utf8")[1]["code"] == "validation"
    status, e = err("422_dims")
    assert status == 422 and e["param"] == "dimensions" and "64" in e["message"]
    status, e = err("422_format")
    assert status == 422 and e["param"] == "encoding_format" and e["type"] == "invalid_request_error"
    status, e = err("400_empty")
    assert status == 400 and e["code"] == "empty" and e["param"] == "input"
    assert err("404_route")[1]["code"] == "not_found"
    assert r["tei_401"].json() == {"error": r["tei_401"].json()["error"], "error_type": "unauthorized"}
    assert r["tei_413"].json()["error_type"] == "payload_too_large"
    assert r["user"].status_code == 200
    assert r["nulls"].status_code == 200 and r["nulls"].json()["data"][0]["embedding"] == pytest.approx(
        r["user"].json()["data"][0]["embedding"]
    )  # floats, full size


# ---------------------------------------------------------------------------------------------- large requests


def _gate_first_batch(app):
    """Hold the worker in its first forward pass until the event is set; record every batch's ids in order."""
    state = app.state.service
    gate, entered, seen = threading.Event(), threading.Event(), []
    original = state.backend.forward

    def forward(task, ids, record):
        seen.append([list(x) for x in ids])
        entered.set()
        if len(seen) == 1:
            gate.wait(10)
        return original(task, ids, record)

    state.backend.forward = forward
    return gate, entered, seen


def test_openai_request_of_2048_inputs_is_sliced_and_does_not_starve_others(tiny_loaded) -> None:
    """Up to 2,048 inputs per /v1/embeddings request (OpenAI's limit), queued max_inputs_per_request at a time:
    a small request that arrives while a large one runs is answered after a few of its slices, not after all."""
    app = make_app(tiny_loaded, max_inputs_per_request=8, max_batch_requests=8, max_batch_wait_ms=0)
    words = "the quick brown fox jumps over a lazy dog".split()
    big = [f"{words[i % 9]} {words[(i * 7) % 9]} {i}" for i in range(64)]
    zebra = tiny_loaded.tokenizer.encode(["zebra"], max_length=10, truncate=False)[0][1]

    async def main():
        async with running(app) as c:
            full = await c.post("/v1/embeddings", json={"input": ["a b"] * 2048})
            over = await c.post("/v1/embeddings", json={"input": ["a"] * 2049})
            tei = await c.post("/embed", json={"inputs": ["a"] * 9})
            gate, entered, seen = _gate_first_batch(app)
            large = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": big}))
            assert await asyncio.to_thread(entered.wait, 10)
            small = asyncio.ensure_future(c.post("/embed", json={"inputs": "zebra"}))
            while app.state.service.batcher.queue_depth < 9:  # the large request's second slice, and the small
                await asyncio.sleep(0.005)
            gate.set()
            return full, over, tei, await large, await small, seen

    full, over, tei, large, small, seen = run(main())
    assert full.status_code == 200 and len(full.json()["data"]) == 2048
    assert [d["index"] for d in full.json()["data"]] == list(range(2048))
    assert over.status_code == 413 and over.json()["error"]["code"] == "too_many_inputs"
    assert "2048" in over.json()["error"]["message"] and over.json()["error"]["param"] == "input"
    assert tei.status_code == 413  # TEI's routes keep TEI's client batch size
    assert large.status_code == 200 and small.status_code == 200
    body = large.json()
    assert [d["index"] for d in body["data"]] == list(range(64))
    for text, item in zip(big, body["data"]):
        assert torch.allclose(torch.tensor(item["embedding"]), reference_embedding(tiny_loaded, text), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == int(large.headers["x-compute-tokens"]) > 64
    assert all(len(batch) <= 8 for batch in seen)
    small_batch = next(i for i, batch in enumerate(seen) if any(zebra in seq for seq in batch))
    assert len(seen) >= 8 and small_batch <= 3, (small_batch, [len(b) for b in seen])


def test_openai_slices_report_input_indexes_over_the_whole_request(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_inputs_per_request=4)
    texts = ["fine"] * 10

    async def main():
        async with running(app) as c:
            long = await c.post("/v1/embeddings", json={"input": texts[:9] + ["word " * 300]})
            empty = await c.post("/v1/embeddings", json={"input": texts[:6] + [""]})
            ids = await c.post("/v1/embeddings", json={"input": [[101, 102]] * 5 + [[101, 10**6]]})
            # A refused request's other slices are withdrawn; one already in a batch finishes and is dropped.
            for _ in range(500):
                if app.state.service.batcher.idle:
                    break
                await asyncio.sleep(0.01)
            return long, empty, ids, app.state.service.batcher.idle

    long, empty, ids, idle = run(main())
    assert long.status_code == 422 and "input 9 has" in long.json()["error"]["message"]
    assert empty.status_code == 400 and "input 6 is an empty string" in empty.json()["error"]["message"]
    assert ids.status_code == 422 and "input 5 has token id" in ids.json()["error"]["message"]
    assert idle


# ---------------------------------------------------------------------------------------------- small things


def test_log_level_flag_is_case_insensitive() -> None:
    from service.cli import build_parser
    from service.settings import Settings

    for given, expected in (("INFO", "info"), ("Debug", "debug"), ("warning", "warning")):
        args = build_parser().parse_args(["serve", "--log-level", given])
        assert args.log_level == expected
        assert Settings(_env_file=None, log_level=given).log_level == expected  # type: ignore[call-arg]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])


def test_every_log_line_of_a_request_carries_its_request_id(tiny_loaded, capsys) -> None:
    """A line logged inside a request (here by the last-resort error handler, and by the inference worker thread
    about that request's input) has the request's id, like its access-log line; a line logged outside any request
    has none."""
    from service.logs import setup_logging

    app = make_app(tiny_loaded)
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("uvicorn.access").disabled
    setup_logging("json", "info")

    async def main():
        async with running(app) as c:

            def broken(n_tokens):
                logging.getLogger("service.test").warning("inside the request")
                raise RuntimeError("a bug")

            app.state.service.neurons_for = broken
            r = await c.post("/embed", json={"inputs": "a"}, headers={"x-request-id": "req-123"})
            del app.state.service.neurons_for
            assert (await c.post("/v1/embeddings", json={"input": "a", "user": "user-42"})).status_code == 200

            backend = app.state.service.backend
            forward, zebra = backend.forward, tiny_loaded.tokenizer.encode(["zebra"], max_length=10, truncate=False)[0]

            def non_finite(task, ids, record):  # the worker thread finds a NaN in this request's row
                out, leaves = forward(task, ids, record)
                out = out.clone()
                for i, seq in enumerate(ids):
                    if list(seq) == zebra:
                        out[i, 0] = float("nan")
                return out, leaves

            backend.forward = non_finite
            nan = await c.post("/embed", json={"inputs": "zebra"}, headers={"x-request-id": "req-nan"})
            del backend.forward
            assert nan.status_code == 500 and "non-finite" in nan.json()["error"], nan.text
            return r

    try:
        r = run(main())
        logging.getLogger("service.test").warning("outside any request")
    finally:
        root.handlers[:], level, logging.getLogger("uvicorn.access").disabled = saved
        root.setLevel(level)
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-123"
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    by_message = {line["message"]: line for line in lines}
    assert by_message["inside the request"]["request_id"] == "req-123"
    unhandled = [line for line in lines if line["message"].startswith("unhandled error")]
    assert unhandled and all(line["request_id"] == "req-123" for line in unhandled)
    access = [line for line in lines if line["logger"] == "service.access"]
    assert [line["request_id"] for line in access if line["route"] == "/embed"] == ["req-123", "req-nan"]
    assert [line.get("user") for line in access if line["route"] == "/v1/embeddings"] == ["user-42"]  # OpenAI's
    assert "request_id" not in by_message["outside any request"]
    (worker,) = [line for line in lines if "non-finite values" in line["message"]]
    assert worker["request_id"] == "req-nan" and worker["logger"] == "engine.batcher"


def test_created_series_only_when_asked(tiny_loaded) -> None:
    async def scrape(app):
        async with running(app) as c:
            await c.post("/embed", json={"inputs": "a"})
            return (await c.get("/metrics")).text

    default = run(scrape(make_app(tiny_loaded)))
    asked = run(scrape(make_app(tiny_loaded, metrics_created=True)))
    assert "ufb_requests_total{" in default and "_created" not in default
    assert "ufb_requests_created{" in asked and "ufb_queue_duration_seconds_created{" in asked


def test_load_generator_and_locustfile_without_their_optional_dependencies(tmp_path) -> None:
    """With aiohttp (and locust) missing: `python -m loadtest --help` and the engine mode work, load modes end in
    one line naming the extra, and the locustfile imports (under a stand-in locust) or says locust is missing."""
    blocked = "import sys; sys.modules['aiohttp'] = None; "

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)

    # `python -m loadtest --help`, run as that command runs it
    helped = python(
        blocked + "import runpy; sys.argv = ['loadtest', '--help']; runpy.run_module('loadtest', run_name='__main__')"
    )
    assert helped.returncode == 0 and "usage" in helped.stdout and "Traceback" not in helped.stderr, helped.stderr
    refused = python(
        blocked + "from loadtest.cli import main; "
        "raise SystemExit(main(['run', 'http://127.0.0.1:9', '--duration', '1']))"
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "needs aiohttp" in refused.stderr and "ultrafastbert-serve[loadtest]" in refused.stderr
    stub = (
        "import types; m = types.ModuleType('locust'); m.FastHttpUser = object; "
        "m.between = lambda a, b: None; m.task = lambda f: f; sys.modules['locust'] = m; "
    )
    loaded = python(
        blocked + stub + "import runpy; ns = runpy.run_path('loadtest/locustfile.py'); "
        "print(ns['EmbeddingUser'].__name__)"
    )
    assert loaded.returncode == 0 and "EmbeddingUser" in loaded.stdout, loaded.stderr
    from loadtest.runner import Workload

    body, n = Workload(route="/predict", inputs_per_request=3, source="builtin").body()
    assert n == 3 and all(isinstance(x, list) and len(x) == 1 for x in body["inputs"])  # a batch, never a pair
    no_locust = python(blocked + "sys.modules['locust'] = None; import runpy; runpy.run_path('loadtest/locustfile.py')")
    assert no_locust.returncode != 0 and "pip install locust" in no_locust.stderr
    assert "Traceback" not in no_locust.stderr
