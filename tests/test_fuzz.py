"""Hostile input (issue 6): property-based fuzzing of every POST route, schema-driven fuzzing from our own
OpenAPI document (schemathesis), and the Unicode and token-id edge cases spelled out.

The promise under test: nothing a client can send produces a 500 or a hang; every refusal is a clean 4xx JSON
``{"error", "error_type"}`` (OpenAI's ``{"error": {...}}`` on its routes); and the service is still ready and idle
afterwards. One real uvicorn on loopback serves the whole module (a per-request timeout turns a hang into a
failure). Example counts are small so the module stays well under a minute on two cores; the strategies lean on
the shapes most likely to break things.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import (  # noqa: F401  (tiny_loaded is a fixture)
    make_app,
    reference_embedding,
    serve_in_thread,
    tiny_loaded,
)

from service.errors import is_openai_path

POST_ROUTES = [
    "/v1/embeddings",
    "/embeddings",
    "/embed",
    "/embed_all",
    "/classify",
    "/predict",
    "/tokenize",
    "/",
    "/invocations",
]
FIELD = {"/v1/embeddings": "input", "/embeddings": "input"}
OPTIONS = [
    "truncate",
    "truncation_direction",
    "normalize",
    "dimensions",
    "top_k",
    "raw_scores",
    "model",
    "encoding_format",
    "add_special_tokens",
    "user",
    "parameters",
    "prompt_name",
]
MAX_INPUTS = 8
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server(tiny_loaded):
    app = make_app(tiny_loaded, max_inputs_per_request=MAX_INPUTS, payload_limit=200_000)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=15) as client:
        yield client, app
    # leaving the block shut the server down; a hang inside would have failed the request timeout


def check_answer(r: httpx.Response) -> None:
    """No 500, always JSON, a 4xx always in the error shape of the route's API (OpenAI's on its routes)."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code >= 400:
        if is_openai_path(r.request.url.path):
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        else:
            assert set(body) == {"error", "error_type"}, body
        kind, message = error_of(r)
        assert kind and message, body
    else:
        assert isinstance(body, (list, dict))


def error_of(r: httpx.Response) -> tuple[str, str]:
    """(kind, message) of an error in either shape, the kind lower-cased: TEI's ``error_type`` is ``Validation``
    where OpenAI's ``code`` is ``validation``."""
    body = r.json()
    if isinstance(body.get("error"), dict):
        return body["error"]["code"].lower(), body["error"]["message"]
    return body["error_type"].lower(), body["error"]


# any character at all, lone surrogates included (json.dumps escapes them as "\ud800")
ANY_CHAR = st.characters(codec=None, exclude_categories=())
NASTY = st.sampled_from(
    [
        "",
        " ",
        "\u200b",
        "\u200d\u200c",
        "\ufeff",
        "\x00",
        "\x1b[31m",
        "\u0301\u0301",
        "\ud800",
        "\udfff",
        "\ud83d\ude00",
        "\U0010ffff",
        "\uffff",
        "[CLS]",
        "[SEP]",
        "##",
        "word " * 300,
        "x" * 1000,
        "\u202e",
        "\n\r\t",
    ]
)
TEXT = st.one_of(st.text(ANY_CHAR, max_size=40), NASTY, st.lists(NASTY, max_size=4).map("".join))
TOKEN_ID = st.one_of(st.integers(-5, 30530), st.integers(-(2**70), 2**70), st.sampled_from([0, 30521, 30522]))
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
INPUTS = st.one_of(
    TEXT,
    st.lists(TEXT, max_size=MAX_INPUTS + 2),
    st.lists(TOKEN_ID, max_size=20),
    st.lists(st.lists(TOKEN_ID, max_size=10), max_size=4),
    st.lists(st.lists(TEXT, max_size=3), max_size=3),  # sentence pairs
    JSON,
)
OPTION_VALUES = st.one_of(SCALAR, st.sampled_from(["Left", "right", "LEFT", "base64", "float"]), st.integers(-3, 100))


def body_for(route: str) -> st.SearchStrategy:
    field = st.builds(
        lambda inputs, opts: {FIELD.get(route, "inputs"): inputs, **opts},
        INPUTS,
        st.dictionaries(st.sampled_from(OPTIONS), OPTION_VALUES, max_size=4),
    )
    return st.one_of(field, field, JSON)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_property_fuzz_post_routes_never_500_or_hang(server, route) -> None:
    client, app = server

    @FUZZ
    @given(body=body_for(route), raw=st.booleans())
    def check(body, raw) -> None:
        content = json.dumps(body, ensure_ascii=raw, allow_nan=True)  # NaN/Infinity: not JSON, must be 422
        r = client.post(
            route, content=content.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
        )
        check_answer(r)

    check()
    assert client.get("/ready").status_code == 200
    assert app.state.service.batcher.idle


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_raw_bytes_bodies(server, data) -> None:
    client, _ = server
    r = client.post("/embed", content=data, headers={"content-type": "application/json"})
    check_answer(r)
    assert r.status_code in (200, 400, 422)


def test_schemathesis_against_our_openapi_schema(server) -> None:
    """Every operation of /openapi.json, cases generated by schemathesis from the schema itself (positive
    and negative modes), checked for server errors and for responses that contradict the schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    client, app = server
    base_url = str(client.base_url).rstrip("/")
    schema = schemathesis.openapi.from_dict(app.openapi())
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()
        ran.append(f"{operation.method.upper()} {operation.path}")
        examples = 30 if operation.method.upper() == "POST" else 5

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=base_url, timeout=15)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            case.validate_response(response, checks=[not_a_server_error])

        check()
    assert {
        "POST /v1/embeddings",
        "POST /embed",
        "POST /classify",
        "POST /predict",
        "POST /tokenize",
        "GET /info",
    } <= set(ran), ran
    assert client.get("/ready").status_code == 200
    assert app.state.service.batcher.idle


# ---------------------------------------------------------------------------------------------- Unicode


def _embed(client, text, **extra) -> httpx.Response:
    return client.post("/embed", json={"inputs": text, **extra})


@pytest.mark.parametrize(
    "text",
    [
        "\u200b\u200b\u200b",  # zero-width spaces only: empty after normalisation
        "\x00\x01\x02\x7f",  # control bytes only: empty after normalisation
        " \t\r\n ",  # whitespace only
        "\u0301\u0308",  # combining marks with nothing to combine with
        "hel\u200blo wo\u200drld\ufeff",  # zero-width characters inside words
        "e\u0301cole",  # NFD combining mark
        "\u00e9cole",  # NFC precomposed
        "Z\u0351\u0364\u0300a\u0352\u0361l\u0307go",  # zalgo: stacks of combining marks
        "\x1b[31mred\x1b[0m\x07 bell",  # terminal escapes and a bell
        "\U0001f600 emoji \U0001f44d\U0001f3fd",  # astral characters, a skin-tone modifier
        "\u202eevil\u202c right-to-left override",
        "x" * 100_000,  # 100k characters, one word: a single [UNK]
    ],
)
def test_unicode_edge_cases_get_the_computed_alone_answer(server, tiny_loaded, text) -> None:
    client, _ = server
    r = _embed(client, text)
    assert r.status_code == 200, r.text
    vec = torch.tensor(r.json()[0])
    assert torch.allclose(vec, reference_embedding(tiny_loaded, text), atol=1e-5, rtol=0)
    assert math.isclose(float(vec.norm()), 1.0, rel_tol=1e-4)


def test_unicode_long_input_with_and_without_truncation(server) -> None:
    client, _ = server
    long = "word " * 20_000  # 100k characters, 20k tokens
    r = _embed(client, long)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert "more than the maximum of 128" in r.json()["error"] and "truncate" in r.json()["error"]
    r = _embed(client, long, truncate=True)
    assert r.status_code == 200 and r.headers["x-compute-tokens"] == "128"
    left = _embed(client, long, truncate=True, truncation_direction="left")
    assert left.status_code == 200 and left.headers["x-compute-tokens"] == "128"
    r = client.post("/v1/embeddings", json={"input": long})  # OpenAI shape: the server's auto-truncate (off)
    assert r.status_code == 422


@pytest.mark.parametrize(
    "route,body",
    [
        ("/embed", b'{"inputs": "\\ud800"}'),
        ("/embed", b'{"inputs": ["fine", "a\\udfffb"]}'),
        ("/v1/embeddings", b'{"input": "\\ud83d"}'),
        ("/classify", b'{"inputs": "\\udc00\\ud800"}'),
        ("/predict", b'{"inputs": ["\\ud800"]}'),
        ("/tokenize", b'{"inputs": "x\\ud800"}'),
    ],
)
def test_lone_surrogates_are_a_clean_422(server, route, body) -> None:
    client, _ = server
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    kind, message = error_of(r)
    assert kind == "validation" and "surrogate" in message


def test_empty_and_undecodable_inputs(server) -> None:
    client, _ = server
    for body in ({"inputs": ""}, {"inputs": []}, {"inputs": ["a", ""]}, {"inputs": [[]]}):
        r = client.post("/embed", json=body)
        assert r.status_code == 400 and r.json()["error_type"] == "Empty", (body, r.text)
    r = client.post("/embed", content=b'{"inputs": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "UTF-8" in r.json()["error"]


# ---------------------------------------------------------------------------------------------- token ids


@pytest.mark.parametrize(
    "ids", [[30522], [-1], [2**31], [2**63], [10**30], [-(10**30)], [1, 2, 99999], [[101, 102], [101, 30522, 102]]]
)
def test_token_ids_outside_the_vocabulary_are_422(server, ids) -> None:
    client, app = server
    for route, field in (("/embed", "inputs"), ("/v1/embeddings", "input")):
        r = client.post(route, json={field: ids})
        assert r.status_code == 422, (route, ids, r.text)
        kind, message = error_of(r)
        assert kind == "validation" and "outside the vocabulary" in message
    assert app.state.service.batcher.idle


@pytest.mark.parametrize("ids", [[1.0], [True], [1, "2"], [None], [[1], "a"], [[1], [2.5]]])
def test_token_ids_of_the_wrong_type_are_422(server, ids) -> None:
    client, _ = server
    r = client.post("/embed", json={"inputs": ids})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation", (ids, r.text)


def test_token_ids_at_the_vocabulary_edges_work(server, tiny_loaded) -> None:
    client, _ = server
    ids = [101, 0, 30521, 102]
    r = client.post("/embed", json={"inputs": ids})
    assert r.status_code == 200
    assert torch.allclose(torch.tensor(r.json()[0]), reference_embedding(tiny_loaded, ids), atol=1e-5, rtol=0)
