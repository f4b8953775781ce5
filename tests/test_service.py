"""The HTTP service in-process (httpx ASGITransport) on the tiny random model with the real tokenizer."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import torch
from service_support import (
    make_app,
    metric,
    metric_samples,
    reference_embedding,
    reference_logits,
    run,
    running,
    settings,
    text_of,
    tiny_loaded,  # noqa: F401  (a fixture)
)

from service.app import create_app

# ---------------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_match_single_computation(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_batch_wait_ms=5)

    async def main():
        async with running(app) as c:
            jobs = []
            for i in range(72):
                texts = [text_of(i)] if i % 3 else [text_of(i), text_of(i + 100), text_of(i + 7)]
                if i % 4 == 0:
                    jobs.append(("openai", texts, c.post("/v1/embeddings", json={"input": texts})))
                elif i % 4 == 1:
                    jobs.append(("classify", texts, c.post("/classify", json={"inputs": texts})))
                else:
                    jobs.append(("embed", texts, c.post("/embed", json={"inputs": texts})))
            responses = await asyncio.gather(*(j[2] for j in jobs))
            return [
                (kind, texts, r.status_code, r.json(), r.headers) for (kind, texts, _), r in zip(jobs, responses)
            ], (await c.get("/metrics")).text

    results, metrics_text = run(main())
    labels = tiny_loaded.config.labels
    for kind, texts, status, body, headers in results:
        assert status == 200, body
        for k in ("x-queue-time", "x-tokenization-time", "x-inference-time", "x-total-time"):
            assert float(headers[k]) >= 0
        if kind == "classify":
            for text, preds in zip(texts, body):
                probs = torch.softmax(reference_logits(tiny_loaded, text), -1)
                assert [p["label"] for p in preds] == sorted(labels, key=lambda lab: -probs[labels.index(lab)])
                for p in preds:
                    assert abs(p["score"] - float(probs[labels.index(p["label"])])) <= 1e-5
            continue
        vectors = [d["embedding"] for d in body["data"]] if kind == "openai" else body
        assert len(vectors) == len(texts)
        for text, vec in zip(texts, vectors):
            ref = reference_embedding(tiny_loaded, text)
            assert torch.allclose(torch.tensor(vec), ref, atol=1e-5, rtol=0), text
    samples = metric_samples(metrics_text)
    batches = sum(metric(samples, "ufb_batch_size_count", task=t) for t in ("embed", "classify"))
    singles = sum(metric(samples, "ufb_batch_size_bucket", task=t, le="1.0") for t in ("embed", "classify"))
    assert batches > 0 and singles < batches, "no batch with more than one input formed"


# ---------------------------------------------------------------------------------------------- routes


def test_routes_shapes_headers_and_neurons(tiny_loaded) -> None:
    app = make_app(tiny_loaded)
    hidden = tiny_loaded.config.hidden_size
    per_token = sum(e for e, _ in tiny_loaded.model.neurons_per_token())
    dense_per_token = sum(d for _, d in tiny_loaded.model.neurons_per_token())

    async def main():
        async with running(app) as c:
            r = await c.post("/embed", json={"inputs": "hello world"})
            assert r.status_code == 200 and len(r.json()) == 1 and len(r.json()[0]) == hidden
            n_tokens = int(r.headers["x-compute-tokens"])
            assert n_tokens == 4  # [CLS] hello world [SEP]
            assert int(r.headers["x-neurons-evaluated"]) == n_tokens * per_token
            assert int(r.headers["x-neurons-dense"]) == n_tokens * dense_per_token

            raw = (await c.post("/embed", json={"inputs": ["hello"], "normalize": False})).json()[0]
            assert torch.allclose(torch.tensor(raw), reference_embedding(tiny_loaded, "hello", False), atol=1e-5)

            r = await c.post("/embed", json={"inputs": ["hello"], "dimensions": 8})
            v = torch.tensor(r.json()[0])
            assert v.shape == (8,) and abs(float(v.norm()) - 1) < 1e-5

            ids = tiny_loaded.tokenizer.encode(["token ids"], max_length=100, truncate=False)[0]
            r = await c.post("/v1/embeddings", json={"input": ids, "model": "whatever"})
            body = r.json()
            assert body["object"] == "list" and body["model"] == tiny_loaded.name
            assert body["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
            assert torch.allclose(
                torch.tensor(body["data"][0]["embedding"]), reference_embedding(tiny_loaded, ids), atol=1e-5
            )

            r = await c.post("/embeddings", json={"input": ["a", "b"], "encoding_format": "base64", "dimensions": 16})
            data = r.json()["data"]
            assert [d["index"] for d in data] == [0, 1]
            vec = np.frombuffer(base64.b64decode(data[1]["embedding"]), dtype="<f4")
            ref = reference_embedding(tiny_loaded, "b")[:16]
            assert np.allclose(vec, (ref / ref.norm()).numpy(), atol=1e-5)

            r = await c.post("/classify", json={"inputs": "great", "top_k": 1, "raw_scores": True})
            preds = r.json()
            assert len(preds) == 1 and len(preds[0]) == 1
            logits = reference_logits(tiny_loaded, "great")
            assert abs(preds[0][0]["score"] - float(logits.max())) < 1e-5

            single = (await c.post("/predict", json={"inputs": "great"})).json()
            batch = (await c.post("/predict", json={"inputs": [["great"], ["awful"]]})).json()
            assert isinstance(single[0], dict) and isinstance(batch[0], list) and len(batch) == 2
            assert single[0]["score"] >= single[1]["score"]

            toks = (await c.post("/tokenize", json={"inputs": "Hello, world"})).json()[0]
            assert toks[0]["special"] and toks[0]["text"] == "[CLS]"
            assert toks[1] == {"id": toks[1]["id"], "text": "Hello", "special": False, "start": 0, "stop": 5}

            left = await c.post("/embed", json={"inputs": "x " * 300, "truncate": True, "truncation_direction": "Left"})
            assert left.status_code == 200 and int(left.headers["x-compute-tokens"]) == 128

            info = (await c.get("/info")).json()
            assert info["model"]["hidden_size"] == hidden and info["model"]["fff_depth"] == 3
            assert info["limits"]["max_inputs_per_request"] == 32
            assert info["limits"]["max_input_tokens"] == 128
            assert info["neurons_per_token"]["evaluated"] == per_token
            assert set(info["kernel"]) >= {"compiled", "name", "warning"}
            assert (await c.get("/health")).json() == {"status": "ok"}
            assert (await c.get("/docs")).status_code == 200
            assert "/v1/embeddings" in (await c.get("/openapi.json")).json()["paths"]

    run(main())


def test_embed_all_gives_every_tokens_final_hidden_state(tiny_loaded) -> None:
    """TEI's /embed_all: per input, one vector per token (special tokens included, in /tokenize's order), equal to
    the model's final hidden states computed alone; their mean is /embed's unnormalised mean-pooled vector."""
    app = make_app(tiny_loaded, max_batch_wait_ms=5)
    tok = tiny_loaded.tokenizer
    texts = [text_of(3), "hello", text_of(40)]
    ids = tok.encode(["token ids"], max_length=100, truncate=False)[0]

    def reference(seq: list[int]) -> torch.Tensor:
        input_ids, mask = tok.pad([seq])
        with torch.inference_mode():
            return tiny_loaded.model(input_ids, mask)[0]

    async def main():
        async with running(app) as c:
            jobs = [
                c.post("/embed_all", json={"inputs": texts}),
                c.post("/embed_all", json={"inputs": ids}),
                c.post("/embed", json={"inputs": texts, "normalize": False}),
                c.post("/tokenize", json={"inputs": texts}),
                c.post("/embed_all", json={"inputs": "x " * 300, "truncate": True, "truncation_direction": "Left"}),
            ]
            return await asyncio.gather(*jobs), (await c.get("/metrics")).text

    (states, by_ids, pooled, tokens, left), metrics_text = run(main())
    assert states.status_code == 200 and states.headers["content-type"] == "application/json"
    body = states.json()
    assert len(body) == len(texts)
    for text, rows, pooled_vec, toks in zip(texts, body, pooled.json(), tokens.json()):
        seq = tok.encode([text], max_length=10**6, truncate=False)[0]
        assert len(rows) == len(toks) == len(seq) and all(len(r) == tiny_loaded.config.hidden_size for r in rows)
        got = torch.tensor(rows)
        assert torch.allclose(got, reference(seq), atol=1e-5, rtol=0), text
        assert torch.allclose(got.mean(0), torch.tensor(pooled_vec), atol=1e-5, rtol=0)
    assert int(states.headers["x-compute-tokens"]) == sum(len(r) for r in body)
    assert torch.allclose(torch.tensor(by_ids.json()[0]), reference(ids), atol=1e-5, rtol=0)
    assert left.status_code == 200 and len(left.json()[0]) == 128
    samples = metric_samples(metrics_text)
    assert metric(samples, "ufb_inputs_total", task="embed_all") == len(texts) + 2


# ---------------------------------------------------------------------------------------------- errors


async def _chunks(total: int, size: int = 1 << 20):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


BAD_REQUESTS = [
    # (route, kwargs for client.post, status, kind): the kind is OpenAI's `code` on /v1/*, and TEI's `error_type`
    # (its capitalised name where TEI has the case) elsewhere; see kind_of
    ("/embed", {"json": {"inputs": []}}, 400, "empty"),
    ("/embed", {"json": {"inputs": ""}}, 400, "empty"),
    ("/embed", {"json": {"inputs": ["ok", ""]}}, 400, "empty"),
    ("/v1/embeddings", {"json": {"input": [[]]}}, 400, "empty"),
    ("/embed", {"json": {"inputs": ["a"] * 33}}, 413, "too_many_inputs"),
    (
        "/embed",
        {"content": b"x" * (10 * 1024 * 1024), "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
    (
        "/embed",
        {"content": _chunks(3_000_000), "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
    ("/embed", {"content": b'{"inputs": "a"', "headers": {"content-type": "application/json"}}, 422, "validation"),
    ("/embed", {"content": b"not json at all", "headers": {"content-type": "application/json"}}, 422, "validation"),
    (
        "/embed",
        {"content": b'{"inputs": "caf\xe9"}', "headers": {"content-type": "application/json"}},
        422,
        "validation",
    ),
    ("/embed", {"content": b"\xff\xfe\x00\x01", "headers": {"content-type": "application/json"}}, 422, "validation"),
    ("/embed", {"json": {"inputs": 5}}, 422, "validation"),
    ("/embed", {"json": {"inputs": True}}, 422, "validation"),
    ("/embed", {"json": {"inputs": [1, "a"]}}, 422, "validation"),
    ("/embed", {"json": {"inputs": None}}, 422, "validation"),
    ("/embed", {"json": {"text": "a"}}, 422, "validation"),
    ("/embed", {"json": ["a", "b"]}, 422, "validation"),
    ("/embed", {"json": {"inputs": "a", "truncation_direction": "middle"}}, 422, "validation"),
    ("/embed", {"json": {"inputs": [[1, 10**9]]}}, 422, "validation"),
    ("/embed", {"json": {"inputs": [[-5]]}}, 422, "validation"),
    ("/embed", {"json": {"inputs": "word " * 200}}, 422, "validation"),
    ("/v1/embeddings", {"json": {"input": "a", "dimensions": 10_000}}, 422, "validation"),
    ("/v1/embeddings", {"json": {"input": "a", "dimensions": 0}}, 422, "validation"),
    ("/v1/embeddings", {"json": {"input": "a", "encoding_format": "hex"}}, 422, "validation"),
    ("/classify", {"json": {"inputs": "a", "top_k": 0}}, 422, "validation"),
    ("/classify", {"json": {"inputs": [[1, 2]]}}, 422, "validation"),
    ("/predict", {"json": {"inputs": [["a", "b"]]}}, 422, "validation"),
    ("/tokenize", {"json": {"inputs": []}}, 400, "empty"),
    ("/embed_all", {"json": {"inputs": []}}, 400, "empty"),
    ("/embed_all", {"json": {"inputs": ["a"] * 33}}, 413, "too_many_inputs"),
    ("/embed_all", {"json": {"inputs": "word " * 200}}, 422, "validation"),
    ("/embed_all", {"json": {"inputs": [[1, 10**9]]}}, 422, "validation"),
]


def kind_of(r) -> str:
    """Our error kind from either body shape: OpenAI's `code` on its routes; TEI's `error_type` elsewhere, mapped
    back from TEI's names (several kinds share one: too_many_inputs is TEI's Validation, told apart by its 413)."""
    body = r.json()
    if isinstance(body["error"], dict):
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
        return body["error"]["code"]
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body
    tei = {"Empty": "empty", "Overloaded": "overloaded", "Unhealthy": "unhealthy", "Backend": "backend"}
    if body["error_type"] == "Validation":
        return "too_many_inputs" if r.status_code == 413 else "validation"
    return tei.get(body["error_type"], body["error_type"])


def test_error_cases_answer_cleanly_and_service_survives(tiny_loaded) -> None:
    app = make_app(tiny_loaded)

    async def main():
        async with running(app) as c:
            for route, kwargs, status, kind in BAD_REQUESTS:
                kwargs = dict(kwargs)
                if route == "/embed" and "content" in kwargs and not isinstance(kwargs["content"], bytes):
                    kwargs["content"] = _chunks(3_000_000)  # a fresh generator each time
                r = await c.post(route, **kwargs)
                assert r.status_code == status, (route, kwargs.get("json"), r.status_code, r.text)
                assert kind_of(r) == kind, r.text
                ok = await c.post("/embed", json={"inputs": "still serving"})
                assert ok.status_code == 200
            r = await c.get("/nowhere")
            assert r.status_code == 404 and r.json()["error_type"] == "not_found"
            r = await c.post("/v1/chat/completions", json={})
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await c.get("/embed")
            assert r.status_code == 405 and "error" in r.json()
            failures = metric_samples((await c.get("/metrics")).text)
            assert metric(failures, "ufb_failures_total", cause="validation") >= 10
            assert metric(failures, "ufb_failures_total", cause="payload_too_large") == 2

    run(main())


def test_auto_truncate_setting(tiny_loaded) -> None:
    app = make_app(tiny_loaded, auto_truncate=True, max_input_tokens=16)

    async def main():
        async with running(app) as c:
            r = await c.post("/embed", json={"inputs": "word " * 200})
            assert r.status_code == 200 and r.headers["x-compute-tokens"] == "16"
            r = await c.post("/embed", json={"inputs": "word " * 200, "truncate": False})
            assert r.status_code == 422

    run(main())


def test_api_key(tiny_loaded) -> None:
    app = make_app(tiny_loaded, api_key="s3cret")

    async def main():
        async with running(app) as c:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "s3cret"},
                {"Authorization": "Basic s3cret"},
            ):
                r = await c.post("/embed", json={"inputs": "a"}, headers=headers)
                assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
            assert (await c.get("/info")).status_code == 401
            # an unauthenticated huge body is refused before it is read
            r = await c.post("/embed", content=b"x" * (10 * 1024 * 1024))
            assert r.status_code == 401
            ok = {"Authorization": "Bearer s3cret"}
            assert (await c.post("/embed", json={"inputs": "a"}, headers=ok)).status_code == 200
            assert (await c.get("/info", headers=ok)).json()["auth"]["api_key_required"] is True
            assert (await c.get("/health")).status_code == 200
            samples = metric_samples((await c.get("/metrics")).text)
            assert metric(samples, "ufb_failures_total", cause="unauthorized") == 6

    run(main())


def test_not_ready_until_started_and_failed_start(tiny_loaded, tmp_path) -> None:
    app = make_app(tiny_loaded)

    import httpx

    async def no_lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
            r = await c.post("/embed", json={"inputs": "a"})
            assert r.status_code == 503
            assert (await c.get("/info")).json()["state"] == "loading"

    run(no_lifespan())
    broken = create_app(settings(tmp_path / "missing"))

    async def failed():
        async with running(broken, wait_ready=False) as c:
            for _ in range(200):
                if (await c.get("/info")).json()["state"] == "failed":
                    break
                await asyncio.sleep(0.01)
            r = await c.get("/ready")
            assert r.status_code == 503 and "failed" in r.json()["error"]
            # a model that failed to start will never serve: liveness says so too (as TEI's /health does)
            for path in ("/health", "/ping", "/"):
                r = await c.get(path)
                assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy", (path, r.text)

    run(failed())


def test_tokenize_renders_in_slices_that_join_into_the_whole_body(tiny_loaded, monkeypatch) -> None:
    """/tokenize builds and renders its body a slice of tokens at a time (so a maximal body never holds the event
    loop for long); with slices of 5 tokens, every row must still be the tokenizer's complete token list: ids,
    text spans, special flags and offsets, across slice boundaries, for rows of 0, 5 and many tokens."""
    from service import routes

    monkeypatch.setattr(routes, "_TOKENS_PER_RENDER", 5)
    app = make_app(tiny_loaded)
    texts = ["Hello, world! " * 7, "a b c", "", "naïve café"]

    async def main():
        async with running(app) as c:
            with_special = await c.post("/tokenize", json={"inputs": texts})
            without = await c.post("/tokenize", json={"inputs": texts, "add_special_tokens": False})
            return with_special, without

    with_special, without = run(main())
    for response, special in ((with_special, True), (without, False)):
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert len(body) == len(texts)
        for text, row, enc in zip(texts, body, tiny_loaded.tokenizer.encodings(texts, special)):
            expected = [
                {
                    "id": tid,
                    "text": tok if sp else text[a:b],
                    "special": bool(sp),
                    "start": None if sp else a,
                    "stop": None if sp else b,
                }
                for tid, tok, (a, b), sp in zip(enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask)
            ]
            assert row == expected, text
    assert [len(r) for r in without.json()][1:3] == [3, 0]
    assert len(with_special.json()[0]) > 20 and len(with_special.json()[1]) == 5  # [CLS] a b c [SEP]: one slice


def test_decode_and_models(tiny_loaded) -> None:
    """TEI's /decode inverts /tokenize's ids; OpenAI's /v1/models lists the one model, /v1/models/{id} finds it."""
    app = make_app(tiny_loaded, served_model_name="my-ufb")

    async def main():
        async with running(app) as c:
            toks = (await c.post("/tokenize", json={"inputs": ["hello world", "a b"]})).json()
            ids = [[t["id"] for t in row] for row in toks]
            decoded = (await c.post("/decode", json={"ids": ids})).json()
            assert decoded == [tiny_loaded.tokenizer.decode(x) for x in ids] == ["hello world", "a b"]
            one = (await c.post("/decode", json={"ids": ids[0], "skip_special_tokens": False})).json()
            assert one == ["[CLS] hello world [SEP]"]
            for body, status, kind in [
                ({"ids": []}, 400, "empty"),
                ({"ids": [[]]}, 400, "empty"),
                ({"ids": [[1, 10**9]]}, 422, "validation"),
                ({"ids": [-1]}, 422, "validation"),
                ({"ids": ["a"]}, 422, "validation"),
                ({"ids": [[1]] * 33}, 413, "too_many_inputs"),
            ]:
                r = await c.post("/decode", json=body)
                assert r.status_code == status and kind_of(r) == kind, (body, r.text)

            models = (await c.get("/v1/models")).json()
            assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["my-ufb"]
            card = models["data"][0]
            assert card["object"] == "model" and card["created"] > 1_600_000_000
            assert (await c.get("/models")).json() == models
            assert (await c.get("/v1/models/my-ufb")).json() == card
            missing = await c.get("/v1/models/gpt-4")
            assert missing.status_code == 404 and missing.json()["error"] == {
                "message": "model 'gpt-4' is not served here (this server serves 'my-ufb')",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }

    run(main())


def test_json_responses_carry_exactly_the_values_starlette_would() -> None:
    """service.responses.JSON swaps the renderer (pydantic's for the json module, ~7x faster on float vectors)
    without changing a value: every float parses back to the same double, strings and nesting are untouched. Only
    the spelling of some numbers differs (0.000015 where json writes 1.5e-05)."""
    import math

    from fastapi.responses import JSONResponse

    from service.responses import JSON

    vectors = torch.randn(3, 384, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 8, 384)
    contents = [
        {
            "object": "list",
            "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors.tolist())],
            "model": "ufb-tiny",
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        },
        [[{"label": "fresh ✓", "score": 0.9}, {"label": "rotten", "score": 0.1}]],
        ["[CLS]", "é", "日本", "\u2028", '"quoted"', "\\"],
        [0.0, -0.0, 1e-45, 1.5e-5, 3.4e38, 1, True, None],
        {"error": "tab\there", "error_type": "validation"},
    ]
    for content in contents:
        ours, theirs = json.loads(JSON(content).body), json.loads(JSONResponse(content).body)
        assert ours == theirs == json.loads(json.dumps(content))
    signs = [math.copysign(1, x) for x in json.loads(JSON([0.0, -0.0]).body)]
    assert signs == [1, -1]
    assert JSON(contents[2]).body == JSONResponse(contents[2]).body  # no number spelled differently: same bytes
    assert JSON([float("nan"), float("inf")]).body == b"[null,null]"  # never invalid JSON
