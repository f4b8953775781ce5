"""The clients people already use, unchanged, against a real uvicorn server (issue 25): huggingface_hub's
InferenceClient on the base URL (TEI's POST /) and on the explicit routes, and LangChain's OpenAIEmbeddings. The
openai client's own tests, errors included, are in test_openai_client.py.

LangChain's HuggingFaceEndpointEmbeddings is not here: its releases since 1.2.2 refuse a URL for ``model`` ("must be
a HuggingFace repo ID"), and those that took one cannot be installed beside our other dependencies (1.0 to 1.2.1
declare huggingface-hub<1.0 or <2.0, transformers 5 needs >=2.4; 0.3.x declares langchain-core<1.0, langchain-openai
1.8 needs >=1.8). What it sent to a TEI URL, ``InferenceClient.feature_extraction`` on the base URL, is tested below."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from service_support import (  # noqa: F401  (tiny_loaded is a fixture)
    make_app,
    metric,
    metric_samples,
    reference_embedding,
    reference_logits,
    serve_in_thread,
    tiny_loaded,
)

# Not "hf_..."-shaped: huggingface_hub sends requests with such a token to Hugging Face's router, not the URL given.
API_KEY = "compat-key"


@pytest.fixture(scope="module")
def server(tiny_loaded) -> Iterator[str]:
    with serve_in_thread(make_app(tiny_loaded, api_key=API_KEY)) as url:
        yield url


@pytest.fixture(autouse=True)
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every request while HF_HUB_OFFLINE is set (conftest sets it for the model tests),
    a loopback server included; these tests reach only the loopback server."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _ranked(loaded, text: str) -> list[str]:
    logits = reference_logits(loaded, text)
    return [loaded.config.labels[i] for i in logits.argsort(descending=True).tolist()]


def test_inference_client_on_the_base_url(server: str, tiny_loaded) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server, api_key=API_KEY, timeout=30)
    texts = ["A quiet film about the sea.", "Loud and long."]
    one = client.feature_extraction(texts[0])
    assert one.shape == (1, tiny_loaded.config.hidden_size)
    assert np.allclose(one[0], reference_embedding(tiny_loaded, texts[0]).numpy(), atol=1e-5)
    both = client.feature_extraction(texts, normalize=False, truncate=True, truncation_direction="Left")
    for text, vec in zip(texts, both):
        assert np.allclose(vec, reference_embedding(tiny_loaded, text, normalize=False).numpy(), atol=1e-5)

    preds = client.text_classification(texts[0])  # a list of labels with scores, best first
    assert [p.label for p in preds] == _ranked(tiny_loaded, texts[0])
    assert sum(p.score for p in preds) == pytest.approx(1.0, abs=1e-5)
    (top,) = client.text_classification(texts[0], top_k=1, function_to_apply="none")
    assert top.label == _ranked(tiny_loaded, texts[0])[0]
    assert top.score == pytest.approx(float(reference_logits(tiny_loaded, texts[0]).max()), abs=1e-5)


def test_inference_client_on_the_explicit_routes(server: str, tiny_loaded) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    embed = InferenceClient(model=server + "/embed", api_key=API_KEY, timeout=30)
    vec = embed.feature_extraction("hello there", dimensions=16)
    ref = reference_embedding(tiny_loaded, "hello there")[:16]
    assert vec.shape == (1, 16) and np.allclose(vec[0], (ref / ref.norm()).numpy(), atol=1e-5)
    with pytest.raises(HfHubHTTPError) as refused:
        embed.feature_extraction("hello", prompt_name="query")
    assert refused.value.response.status_code == 422 and "prompt" in refused.value.response.json()["error"]

    # TEI's /predict answers one string with one flat list; the client takes its first item, the best label
    # (the same against TEI itself). The base URL above gives the whole list.
    top = InferenceClient(model=server + "/predict", api_key=API_KEY, timeout=30).text_classification("great")
    assert top.label == _ranked(tiny_loaded, "great")[0]

    with pytest.raises(HfHubHTTPError) as unauthorized:
        InferenceClient(base_url=server, api_key="wrong", timeout=30).feature_extraction("hello")
    assert unauthorized.value.response.status_code == 401


def test_langchain_openai_embeddings(server: str, tiny_loaded) -> None:
    """OpenAIEmbeddings with check_embedding_ctx_length=False sends the texts (by default it sends tiktoken ids,
    which mean nothing to a BERT vocabulary), at its default of 1,000 per request: 1,001 documents are two
    requests, one of them far above the 32 inputs of TEI's routes."""
    import httpx
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model="ultrafastbert", base_url=server + "/v1", api_key=API_KEY, check_embedding_ctx_length=False, max_retries=0
    )
    assert emb.chunk_size == 1000

    def requests_served() -> float:
        text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
        return metric(metric_samples(text), "ufb_requests_total", route="/v1/embeddings", status="200")

    before = requests_served()
    docs = [f"document number {i} is about {'cats' if i % 2 else 'dogs'}" for i in range(1001)]
    vectors = emb.embed_documents(docs)
    assert requests_served() - before == 2
    assert len(vectors) == 1001
    for i in [*range(0, 1001, 40), 999, 1000]:  # both requests, first and last of each
        assert np.allclose(vectors[i], reference_embedding(tiny_loaded, docs[i]).numpy(), atol=1e-5), i
    query = emb.embed_query("which pets?")
    assert np.allclose(query, reference_embedding(tiny_loaded, "which pets?").numpy(), atol=1e-5)
