"""A real uvicorn server on a free loopback port answers the official ``openai`` client, unchanged."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from service_support import make_app, reference_embedding, serve_in_thread, tiny_loaded  # noqa: F401

API_KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_loaded) -> Iterator[str]:
    port = _free_port()
    app = make_app(tiny_loaded, api_key=API_KEY, port=port)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("server never became ready")
    yield base
    srv.should_exit = True
    thread.join(timeout=30)


def _vector(embedding: list[float] | str) -> np.ndarray:
    """The client decodes base64 itself only when it chose the format; asked for explicitly, it hands the string
    back (as the real OpenAI API does), so decode it the documented way: little-endian float32."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def _client(base: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_openai_client_embeddings(server: str, tiny_loaded, encoding_format: str | None) -> None:
    texts = ["The quick brown fox.", "A much longer sentence about nothing in particular, really."]
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    sent: list[dict] = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(json.loads(r.content))]})
    client = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=30, http_client=http)
    resp = client.embeddings.create(model="ultrafastbert", input=texts, user="user-7", **kwargs)
    assert sent[0]["encoding_format"] == (encoding_format or "base64") and sent[0]["user"] == "user-7"
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0
    assert resp.model == tiny_loaded.name
    for text, item in zip(texts, resp.data):
        ref = reference_embedding(tiny_loaded, text).numpy()
        assert np.allclose(_vector(item.embedding), ref, atol=1e-5)
        # no format given: the client asked for base64 (above) and decoded it into floats itself
        assert isinstance(item.embedding, str) == (encoding_format == "base64")
    client.close()


def test_openai_client_single_string_and_dimensions(server: str, tiny_loaded) -> None:
    resp = _client(server).embeddings.create(model="m", input="hello", dimensions=16, encoding_format="base64")
    vec = _vector(resp.data[0].embedding)
    assert vec.shape == (16,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5


def test_openai_client_lists_and_retrieves_the_model(server: str) -> None:
    client = _client(server)
    (model,) = client.models.list().data  # what tools call first to discover the server's model
    assert model.object == "model" and model.owned_by == "ultrafastbert-serve" and model.created > 0
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()


def test_openai_client_errors_are_status_errors(server: str) -> None:
    """Each status gives the client's exception for it, with OpenAI's error fields (message, type, param, code)."""

    def fields(exc: openai.APIStatusError) -> tuple[int, str | None, str | None, str | None]:
        assert exc.message and isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
        return exc.status_code, exc.type, exc.code, exc.param

    with pytest.raises(openai.AuthenticationError) as e401:
        _client(server, key="wrong").embeddings.create(model="m", input="hello")
    assert fields(e401.value) == (401, "invalid_request_error", "invalid_api_key", None)
    assert "API key" in e401.value.message
    with pytest.raises(openai.BadRequestError) as e400:
        _client(server).embeddings.create(model="m", input=[])
    assert fields(e400.value) == (400, "invalid_request_error", "empty", "input") and "empty" in e400.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e422:
        _client(server).embeddings.create(model="m", input="hello", dimensions=10_000)
    assert fields(e422.value) == (422, "invalid_request_error", "validation", "dimensions")
    assert "10000" in e422.value.message
    with pytest.raises(openai.APIStatusError) as e413:
        _client(server).embeddings.create(model="m", input=["a"] * 2049)
    assert fields(e413.value) == (413, "invalid_request_error", "too_many_inputs", "input")
    assert "2048" in e413.value.message
    with pytest.raises(openai.APIStatusError) as e413_body:  # refused by the body-size middleware, before routing
        _client(server).embeddings.create(model="m", input="word " * 500_000)
    assert fields(e413_body.value) == (413, "invalid_request_error", "payload_too_large", None)
    assert "bytes" in e413_body.value.message


def test_openai_client_rate_limit_error_on_a_full_queue(tiny_loaded) -> None:
    """429 with Retry-After when the queue is full: the client's RateLimitError (it would retry, honouring
    Retry-After, with max_retries above 0)."""
    app = make_app(tiny_loaded, max_queued_inputs=1)
    state = app.state.service
    gate, entered = threading.Event(), threading.Event()
    with serve_in_thread(app) as url:
        original = state.backend.forward

        def held(task, ids, record):
            entered.set()
            gate.wait(10)
            return original(task, ids, record)

        state.backend.forward = held
        client = _client(url)
        busy = [
            threading.Thread(target=client.embeddings.create, kwargs={"model": "m", "input": t})
            for t in ("in the forward pass", "queued")
        ]
        try:
            busy[0].start()
            assert entered.wait(10)
            busy[1].start()
            while state.batcher.queue_depth < 1:
                time.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as e429:
                client.embeddings.create(model="m", input="one too many")
        finally:
            gate.set()
            for t in busy:
                t.join(30)
    err = e429.value
    assert (err.status_code, err.code, err.type) == (429, "overloaded", "rate_limit_error")
    assert "queue is full" in err.message and set(err.body) == {"message", "type", "param", "code"}
    assert int(err.response.headers["retry-after"]) >= 1


def test_real_server_payload_limit_and_health(server: str) -> None:
    assert httpx.get(server + "/health").status_code == 200
    r = httpx.post(
        server + "/embed",
        content=b"x" * 3_000_000,
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    r = httpx.post(server + "/embed", json={"inputs": "still alive"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
