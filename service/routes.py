"""HTTP routes: translate OpenAI/TEI request shapes into batcher calls and results back into their shapes.

Routes hold no model logic. Each inference call runs under a watch for client disconnects: when the client
goes away its task is cancelled, which withdraws its inputs from the batcher's queue before they cost compute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from engine.batcher import Result, Task, check_vocabulary
from engine.tokenizer import Tokenizer
from service import __version__
from service import errors as E
from service import schemas as S
from service.metrics import CONTENT_TYPE_LATEST
from service.responses import JSON, render_json
from service.state import ServiceState, kernel_info

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorResponse, "description": desc}
    for code, desc in [(400, "Empty input"), (401, "Missing or invalid API key"),
                       (413, "Too many inputs or payload too large"), (422, "Malformed or invalid input"),
                       (429, "Overloaded; retry after Retry-After seconds"), (503, "Not ready"),
                       (504, "Deadline exceeded")]
}


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody will read the answer."""


def _state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


def _ready_state(request: Request) -> ServiceState:
    state = _state(request)
    if not state.ready or state.batcher is None:
        raise E.not_ready(f"the model is not ready (state: {state.phase})")
    return state


# ---------------------------------------------------------------------------------------------------- inputs


def _split_inputs(inputs: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI/TEI input unions -> (texts, token_ids), exactly one of them set."""
    if isinstance(inputs, str):
        return [inputs], None
    if not inputs:
        return [], None
    if isinstance(inputs[0], str):
        return list(inputs), None
    if isinstance(inputs[0], int):
        return None, [list(inputs)]
    return None, [list(x) for x in inputs]


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _cancellable(request: Request, work: Coroutine[Any, Any, Result]) -> Result:
    """Run ``work`` unless the client disconnects first; then cancel it (its queued inputs are withdrawn)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def _infer(request: Request, task: Task, inputs: Any, truncate: bool | None,
                 direction: str) -> tuple[Result, dict[str, str], ServiceState]:
    state = _ready_state(request)
    texts, ids = _split_inputs(inputs)
    n = len(texts if texts is not None else ids or [])
    if n == 0:
        raise E.empty("the input is empty")
    limit = state.settings.max_inputs_per_request
    if n > limit:
        raise E.too_many_inputs(n, limit)
    arrival = request.scope.get("state", {}).get("t_arrival", time.monotonic())
    deadline = arrival + state.settings.request_timeout_s
    assert state.batcher is not None
    try:
        result = await _cancellable(request, state.batcher.submit(
            task, texts=texts, token_ids=ids,
            truncate=state.settings.auto_truncate if truncate is None else truncate,
            direction=direction.lower(), deadline=deadline))
    except ClientGone:
        state.metrics.failure("client_disconnected")
        raise
    state.metrics.observe_result(task.value, result.token_counts, result.queue_s, result.tokenization_s)
    evaluated, dense = state.neurons_for(result.total_tokens)
    t_start = request.scope.get("state", {}).get("t_start", time.perf_counter())
    headers = {
        "x-queue-time": f"{result.queue_s * 1e3:.3f}",
        "x-tokenization-time": f"{result.tokenization_s * 1e3:.3f}",
        "x-inference-time": f"{result.inference_s * 1e3:.3f}",
        "x-total-time": f"{(time.perf_counter() - t_start) * 1e3:.3f}",
        "x-compute-tokens": str(result.total_tokens),
        "x-neurons-evaluated": str(evaluated),
        "x-neurons-dense": str(dense),
    }
    return result, headers, state


def _shape_embeddings(outputs: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    hidden = outputs.shape[1]
    if dimensions is not None:
        if dimensions > hidden:
            raise E.validation(f"dimensions {dimensions} is larger than the model's {hidden}")
        outputs = outputs[:, :dimensions]
    if normalize:
        outputs = F.normalize(outputs, p=2, dim=-1)
    return outputs


def _b64(vec: torch.Tensor) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(vec.numpy().astype("<f4", copy=False).tobytes()).decode("ascii")


def _predictions(state: ServiceState, logits: torch.Tensor, raw: bool,
                 top_k: int | None) -> list[list[dict[str, Any]]]:
    labels = state.labels or []
    scores = logits if raw else torch.softmax(logits, dim=-1)
    out = []
    for row in scores.tolist():
        ranked = sorted(zip(labels, row), key=lambda p: -p[1])
        out.append([{"label": lab, "score": s} for lab, s in ranked[:top_k]])
    return out


def _check_classifier(request: Request) -> ServiceState:
    state = _ready_state(request)
    if not state.labels:
        raise E.ServiceError(400, f"model {state.model_name!r} has no classification head", "unsupported")
    return state


# ---------------------------------------------------------------------------------------------------- routes


@router.post("/v1/embeddings", response_model=S.OpenAIEmbeddingResponse, responses=_ERRORS,
             tags=["OpenAI"], summary="OpenAI-compatible embeddings")
@router.post("/embeddings", response_model=S.OpenAIEmbeddingResponse, responses=_ERRORS, tags=["OpenAI"],
             include_in_schema=False)
async def openai_embeddings(body: S.OpenAIEmbeddingRequest, request: Request) -> Response:
    hidden = _ready_state(request).loaded.config.hidden_size
    if body.dimensions is not None and body.dimensions > hidden:
        raise E.validation(f"dimensions {body.dimensions} is larger than the model's {hidden}")
    result, headers, state = await _infer(request, Task.EMBED, body.input, None, "right")
    vectors = _shape_embeddings(result.outputs, True, body.dimensions)
    enc = _b64 if body.encoding_format == "base64" else (lambda v: v.tolist())
    data = [{"object": "embedding", "embedding": enc(v), "index": i} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens}
    return JSON({"object": "list", "data": data, "model": state.model_name, "usage": usage}, headers=headers)


@router.post("/embed", response_model=list[list[float]], responses=_ERRORS, tags=["TEI"],
             summary="TEI-compatible embeddings")
async def embed(body: S.EmbedRequest, request: Request) -> Response:
    hidden = _ready_state(request).loaded.config.hidden_size
    if body.dimensions is not None and body.dimensions > hidden:
        raise E.validation(f"dimensions {body.dimensions} is larger than the model's {hidden}")
    result, headers, _ = await _infer(request, Task.EMBED, body.inputs, body.truncate, body.truncation_direction)
    vectors = _shape_embeddings(result.outputs, body.normalize, body.dimensions)
    return JSON(vectors.tolist(), headers=headers)


@router.post("/embed_all", response_model=list[list[list[float]]], responses=_ERRORS, tags=["TEI"],
             summary="TEI-compatible token embeddings: every token's final hidden state")
async def embed_all(body: S.EmbedAllRequest, request: Request) -> Response:
    """One ``[tokens][hidden]`` list per input, special tokens included, in the order ``/tokenize`` lists them.

    Streamed one input at a time, each rendered on a worker thread (Starlette runs a plain iterator's steps in its
    thread pool): 32 inputs of 512 tokens are 6.3 M floats, over 100 MB of JSON. Rendered whole on the event loop
    they would hold every other request for a second; rendered whole anywhere they would need that much memory
    again in Python floats, per request. Streaming bounds both to one input's rows, and a client that reads
    slowly holds back only its own rendering."""
    result, headers, _ = await _infer(request, Task.EMBED_ALL, body.inputs, body.truncate,
                                      body.truncation_direction)
    states: list[torch.Tensor] = result.outputs  # type: ignore[assignment]
    return StreamingResponse(_json_array(states), media_type="application/json", headers=headers)


def _json_array(states: Sequence[torch.Tensor]) -> Iterator[bytes]:
    yield b"["
    for i, rows in enumerate(states):
        yield (b"," if i else b"") + render_json(rows.tolist())
    yield b"]"


@router.post("/classify", response_model=list[list[S.Prediction]], responses=_ERRORS, tags=["Classification"],
             summary="Labels with scores per input, best first")
async def classify(body: S.ClassifyRequest, request: Request) -> Response:
    _check_classifier(request)
    result, headers, state = await _infer(request, Task.CLASSIFY, body.inputs, body.truncate,
                                          body.truncation_direction)
    return JSON(_predictions(state, result.outputs, body.raw_scores, body.top_k), headers=headers)


@router.post("/predict", response_model=list[S.Prediction] | list[list[S.Prediction]], responses=_ERRORS,
             tags=["TEI"], summary="TEI-compatible classification")
async def predict(body: S.PredictRequest, request: Request) -> Response:
    _check_classifier(request)
    inputs = body.inputs
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], list):
        raise E.validation("sentence pairs are not supported by this model; send a string or a list of strings")
    result, headers, state = await _infer(request, Task.CLASSIFY, inputs, body.truncate,
                                          body.truncation_direction)
    preds = _predictions(state, result.outputs, body.raw_scores, None)
    return JSON(preds[0] if isinstance(inputs, str) else preds, headers=headers)


@router.post("/tokenize", response_model=list[list[S.SimpleToken]], responses=_ERRORS, tags=["TEI"],
             summary="Tokens with character offsets")
async def tokenize(body: S.TokenizeRequest, request: Request) -> Response:
    state = _ready_state(request)
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not texts:
        raise E.empty("the input is empty")
    if len(texts) > state.settings.max_inputs_per_request:
        raise E.too_many_inputs(len(texts), state.settings.max_inputs_per_request)
    assert state.batcher is not None
    content = await state.batcher.run_in_tokenizer_pool(
        _tokens_json, state.loaded.tokenizer, texts, body.add_special_tokens)
    return Response(content, media_type="application/json")


_TOKENS_PER_RENDER = 4096


def _tokens_json(tokenizer: Tokenizer, texts: list[str], special: bool) -> bytes:
    """The /tokenize body (TEI's SimpleToken lists), built and rendered a slice of tokens at a time.

    A maximal body (2 MB of text, ~360,000 tokens, ~26 MB of JSON) built whole, as one list of dicts rendered in
    one call, held the GIL, and with it the event loop and every other request, for up to ~250 ms: the serializer
    is native code that keeps the GIL until it returns, and 360,000 long-lived dicts set off full garbage
    collections. Slices of a few thousand tokens are rendered and dropped before the next is built, so the
    longest hold is one slice's (a few ms) or one tokenizer call's."""
    parts: list[bytes] = [b"["]
    for i, (text, enc) in enumerate(zip(texts, tokenizer.encodings(texts, special))):
        # enc.tokens is not read: a non-special token's text is its span of the input, and fetching all token
        # strings from Rust costs as much again as the offsets.
        spans = zip(enc.ids, enc.offsets, enc.special_tokens_mask)
        parts += (b"," if i else b"", _json_list(
            {"id": tid, "text": tokenizer.id_to_token(tid) if sp else text[a:b], "special": bool(sp),
             "start": None if sp else a, "stop": None if sp else b}
            for tid, (a, b), sp in spans))
    parts.append(b"]")
    return b"".join(parts)


def _json_list(items: Iterator[Any]) -> bytes:
    """``render_json(list(items))``, built and rendered _TOKENS_PER_RENDER items at a time."""
    slices = []
    while chunk := list(itertools.islice(items, _TOKENS_PER_RENDER)):
        slices.append(render_json(chunk)[1:-1])
    return b"[" + b",".join(slices) + b"]"


@router.post("/decode", response_model=list[str], responses=_ERRORS, tags=["TEI"],
             summary="Token ids back to text")
async def decode(body: S.DecodeRequest, request: Request) -> Response:
    state = _ready_state(request)
    _, seqs = _split_inputs(body.ids)
    seqs = seqs or []
    if not seqs or not any(seqs):
        raise E.empty("no token ids to decode")
    if len(seqs) > state.settings.max_inputs_per_request:
        raise E.too_many_inputs(len(seqs), state.settings.max_inputs_per_request)
    assert state.batcher is not None and state.backend is not None
    for i, seq in enumerate(seqs):
        check_vocabulary(seq, i, state.backend.vocab_size)  # InvalidInput: 422 through the batcher-error handler
    texts = await state.batcher.run_in_tokenizer_pool(
        lambda: [state.loaded.tokenizer.decode(s, skip_special_tokens=body.skip_special_tokens) for s in seqs])
    return JSON(texts)


def _model_card(state: ServiceState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": int(state.ready_since or 0),
            "owned_by": "ultrafastbert-serve"}


@router.get("/v1/models", response_model=S.OpenAIModelList, responses=_ERRORS, tags=["OpenAI"],
            summary="OpenAI-compatible model list: the one model this server serves")
@router.get("/models", response_model=S.OpenAIModelList, responses=_ERRORS, tags=["OpenAI"],
            include_in_schema=False)
async def list_models(request: Request) -> Response:
    return JSON({"object": "list", "data": [_model_card(_ready_state(request))]})


@router.get("/v1/models/{model_id:path}", response_model=S.OpenAIModel,
            responses={**_ERRORS, 404: {"model": S.ErrorResponse, "description": "No such model"}},
            tags=["OpenAI"], summary="OpenAI-compatible model lookup")
async def get_model(model_id: str, request: Request) -> Response:
    state = _ready_state(request)
    if model_id != state.model_name:
        raise E.ServiceError(404, f"model {model_id!r} is not served here (this server serves "
                                  f"{state.model_name!r})", "not_found")
    return JSON(_model_card(state))


@router.get("/health", tags=["Probes"], summary="Liveness: 200 while the process runs")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", tags=["Probes"], summary="Readiness: 200 once the model is loaded and warm",
            responses={503: {"model": S.ErrorResponse, "description": "Loading, failed or shutting down"}})
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.ready:
        return JSON({"status": "ready"})
    msg = f"not ready: {state.phase}" + (f" ({state.error})" if state.error else "")
    return JSON(E.error_body(msg, "unhealthy"), status_code=503)


@router.get("/metrics", tags=["Probes"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", tags=["Probes"], summary="Model, shape, neuron usage, kernel and every limit")
async def info(request: Request) -> dict[str, Any]:
    return build_info(_state(request))


def build_info(state: ServiceState) -> dict[str, Any]:
    s = state.settings
    kernel = kernel_info()
    model: dict[str, Any] | None = None
    if state.loaded is not None:
        c = state.loaded.config
        model = {
            "name": state.model_name, "path": str(state.loaded.path), "layout": c.layout,
            "source_format": getattr(state.loaded, "source_format", None),
            "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_heads": c.num_heads, "ffn": c.ffn,
            "fff_trees": c.fff_trees if c.ffn == "fff" else None,
            "fff_depth": c.fff_depth if c.ffn == "fff" else None,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "pooling": c.pooling, "normalize": c.normalize, "labels": c.labels, "weight_dtype": s.weight_dtype,
            "compute_dtype": s.compute_dtype,
        }
    npt = [{"layer": i, "evaluated": e, "dense": d, "fraction": (e / d) if d else None}
           for i, (e, d) in enumerate(state.neurons_per_token)]
    total_e, total_d = state.neurons_for(1)
    return {
        "version": __version__,
        "state": state.phase,
        "error": state.error,
        "model": model,
        "neurons_per_token": {"per_layer": npt, "evaluated": total_e, "dense": total_d,
                              "fraction": (total_e / total_d) if total_d else None},
        "kernel": {"compiled": kernel.compiled, "name": kernel.name, "description": kernel.describe(),
                   "warning": None if kernel.compiled else
                   f"SLOW FALLBACK: {kernel.describe()}"},
        "limits": {
            "max_batch_tokens": s.max_batch_tokens, "max_batch_requests": s.max_batch_requests,
            "max_batch_wait_ms": s.max_batch_wait_ms, "max_queued_inputs": s.max_queued_inputs,
            "max_queued_tokens": s.max_queued_tokens, "max_concurrent_requests": s.max_concurrent_requests,
            "max_inputs_per_request": s.max_inputs_per_request,
            "max_input_tokens": state.max_input_tokens or s.max_input_tokens, "auto_truncate": s.auto_truncate,
            "payload_limit_bytes": s.payload_limit, "request_timeout_s": s.request_timeout_s,
            "shutdown_grace_s": s.shutdown_grace_s, "shutdown_delay_s": s.shutdown_delay_s,
            "keep_alive_timeout_s": s.keep_alive_timeout_s,
        },
        "inference": {"workers": s.inference_workers,
                      "torch_threads_per_worker": (state.batcher.limits.threads_per_worker
                                                   if state.batcher is not None else None)
                      or torch.get_num_threads()},
        "auth": {"api_key_required": s.api_key is not None,
                 "metrics_require_key": s.api_key is not None and s.metrics_require_key},
    }
