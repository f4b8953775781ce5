"""HTTP routes: translate OpenAI/TEI request shapes into batcher calls (service/submit.py) and results back into
their shapes. Routes hold no model logic."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.backend import Task
from engine.batcher import check_vocabulary
from engine.tokenizer import Tokenizer
from service import errors as E
from service import schemas as S
from service.info import build_info
from service.metrics import CONTENT_TYPE_LATEST
from service.responses import JSON, render_json
from service.state import Phase, ServiceState
from service.submit import infer, one_tensor, per_input, ready_state, split_inputs, state_of

router = APIRouter()

_STATUSES = [
    (400, "Empty input"),
    (401, "Missing or invalid API key"),
    (413, "Too many inputs or payload too large"),
    (422, "Malformed or invalid input"),
    (429, "Overloaded; retry after Retry-After seconds"),
    (503, "Not ready"),
    (504, "Deadline exceeded"),
]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorResponse, "description": desc} for code, desc in _STATUSES
}
_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.OpenAIErrorResponse, "description": desc} for code, desc in _STATUSES
}


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


def _predictions(
    state: ServiceState, logits: torch.Tensor, scores: str, top_k: int | None
) -> list[list[dict[str, Any]]]:
    """Per input, ``{label, score}`` best first; ``scores``: softmax (probabilities), sigmoid, or none (logits)."""
    labels = state.labels or []
    values = {"softmax": lambda x: torch.softmax(x, dim=-1), "sigmoid": torch.sigmoid, "none": lambda x: x}[scores](
        logits
    )
    out = []
    for row in values.tolist():
        ranked = sorted(zip(labels, row), key=lambda p: -p[1])
        out.append([{"label": lab, "score": s} for lab, s in ranked[:top_k]])
    return out


def _check_classifier(request: Request) -> ServiceState:
    state = ready_state(request)
    if not state.labels:
        raise E.ServiceError(400, f"model {state.model_name!r} has no classification head", "unsupported")
    return state


def _check_dimensions(request: Request, dimensions: int | None) -> None:
    hidden = ready_state(request).loaded_model.config.hidden_size
    if dimensions is not None and dimensions > hidden:
        raise E.validation(f"dimensions {dimensions} is larger than the model's {hidden}", param="dimensions")


# ---------------------------------------------------------------------------------------------------- routes


@router.post(
    "/v1/embeddings",
    response_model=S.OpenAIEmbeddingResponse,
    responses=_OPENAI_ERRORS,
    tags=["OpenAI"],
    summary="OpenAI-compatible embeddings",
)
@router.post(
    "/embeddings",
    response_model=S.OpenAIEmbeddingResponse,
    responses=_OPENAI_ERRORS,
    tags=["OpenAI"],
    include_in_schema=False,
)
async def openai_embeddings(body: S.OpenAIEmbeddingRequest, request: Request) -> Response:
    _check_dimensions(request, body.dimensions)
    if body.user is not None:
        request.scope.setdefault("state", {})["openai_user"] = body.user  # the access log records it
    result, headers, state = await infer(
        request,
        Task.EMBED,
        body.input,
        None,
        "right",
        max_inputs=state_of(request).settings.max_inputs_per_openai_request,
        param="input",
    )
    vectors = _shape_embeddings(one_tensor(result.outputs), True, body.dimensions)
    enc = _b64 if body.encoding_format == "base64" else (lambda v: v.tolist())
    data = [{"object": "embedding", "embedding": enc(v), "index": i} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens}
    return JSON({"object": "list", "data": data, "model": state.model_name, "usage": usage}, headers=headers)


@router.post(
    "/embed", response_model=list[list[float]], responses=_ERRORS, tags=["TEI"], summary="TEI-compatible embeddings"
)
async def embed(body: S.EmbedRequest, request: Request) -> Response:
    _check_dimensions(request, body.dimensions)
    result, headers, _ = await infer(request, Task.EMBED, body.inputs, body.truncate, body.truncation_direction)
    vectors = _shape_embeddings(one_tensor(result.outputs), body.normalize, body.dimensions)
    return JSON(vectors.tolist(), headers=headers)


@router.post(
    "/embed_all",
    response_model=list[list[list[float]]],
    responses=_ERRORS,
    tags=["TEI"],
    summary="TEI-compatible token embeddings: every token's final hidden state",
)
async def embed_all(body: S.EmbedAllRequest, request: Request) -> Response:
    """One ``[tokens][hidden]`` list per input, special tokens included, in the order ``/tokenize`` lists them.

    Streamed one input at a time, each rendered on a worker thread (Starlette runs a plain iterator's steps in its
    thread pool): 32 inputs of 512 tokens are 6.3 M floats, over 100 MB of JSON. Rendered whole on the event loop
    they would hold every other request meanwhile; rendered whole anywhere they would need that much memory
    again in Python floats, per request. Streaming bounds both to one input's rows, and a client that reads
    slowly holds back only its own rendering."""
    result, headers, _ = await infer(request, Task.EMBED_ALL, body.inputs, body.truncate, body.truncation_direction)
    states = per_input(result.outputs)
    return StreamingResponse(_json_array(states), media_type="application/json", headers=headers)


def _json_array(states: Sequence[torch.Tensor]) -> Iterator[bytes]:
    yield b"["
    for i, rows in enumerate(states):
        yield (b"," if i else b"") + render_json(rows.tolist())
    yield b"]"


@router.post(
    "/classify",
    response_model=list[list[S.Prediction]],
    responses=_ERRORS,
    tags=["Classification"],
    summary="Labels with scores per input, best first",
)
async def classify(body: S.ClassifyRequest, request: Request) -> Response:
    _check_classifier(request)
    result, headers, state = await infer(request, Task.CLASSIFY, body.inputs, body.truncate, body.truncation_direction)
    scores = "none" if body.raw_scores else "softmax"
    return JSON(_predictions(state, one_tensor(result.outputs), scores, body.top_k), headers=headers)


@router.post(
    "/predict",
    response_model=list[S.Prediction] | list[list[S.Prediction]],
    responses=_ERRORS,
    tags=["TEI"],
    summary="TEI-compatible classification",
)
async def predict(body: S.PredictRequest, request: Request) -> Response:
    """TEI's three forms: ``"a"`` or ``["a"]`` (one input: one list of predictions), ``["a", "b"]`` (a sentence
    pair), ``[["a"], ["b", "c"]]`` (a batch: one list per item). Pairs are refused: the models served here
    classify single sequences."""
    state = _check_classifier(request)
    texts, batched = _predict_inputs(body.inputs, state.model_name)
    result, headers, state = await infer(request, Task.CLASSIFY, texts, body.truncate, body.truncation_direction)
    preds = _predictions(state, one_tensor(result.outputs), "none" if body.raw_scores else "softmax", None)
    return JSON(preds if batched else preds[0], headers=headers)


def _predict_inputs(inputs: str | list[str] | list[list[str]], model: str) -> tuple[list[str], bool]:
    """TEI's ``/predict`` input forms -> (texts, whether the answer is a batch)."""

    def pair(where: str) -> E.ServiceError:
        return E.validation(
            f"{where} is a sentence pair, and model {model!r} classifies single sequences; send "
            'one string, or a batch of single texts [["a"], ["b"]]',
            param="inputs",
        )

    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        raise E.empty("the input is empty", param="inputs")
    first = inputs[0]
    if isinstance(first, str):
        if len(inputs) == 1:
            return [first], False
        if len(inputs) == 2:
            raise pair("the input")
        raise E.validation(
            f'the input is a list of {len(inputs)} strings; send one string, a pair ["a", "b"], '
            'or a batch [["a"], ["b"], ...]',
            param="inputs",
        )
    texts: list[str] = []
    for i, item in enumerate(inputs):
        if len(item) == 2:
            raise pair(f"input {i}")
        if len(item) != 1:
            raise E.validation(
                f"input {i} has {len(item)} strings; each batch item is [text] (or a pair)", param="inputs"
            )
        texts.append(item[0])
    return texts, True


@router.post("/", responses=_ERRORS, tags=["TEI"], include_in_schema=False)
@router.post("/invocations", responses=_ERRORS, tags=["TEI"], include_in_schema=False)
async def default_route(request: Request) -> Response:
    """TEI's catch-all route (``/invocations`` is SageMaker's name for it). TEI sends it to the one task its model
    has; models here both embed and classify, so the body decides (docs/compatibility.md):

    * ``parameters`` present: the Hugging Face Inference API's text-classification body (``InferenceClient``'s
      ``text_classification``), answered in that API's shape, one list of ``{label, score}`` per input;
    * ``raw_scores`` present, or ``inputs`` a batch of lists of strings: ``/predict``;
    * anything else: ``/embed`` (``InferenceClient``'s ``feature_extraction``, which posts no task field)."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise E.validation(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise E.validation("the body must be a JSON object with an `inputs` field")
    inputs = body.get("inputs")
    if "parameters" in body:
        return await _text_classification(_parse(S.TextClassificationRequest, body), request)
    if "raw_scores" in body or (
        isinstance(inputs, list)
        and inputs
        and isinstance(inputs[0], list)
        and any(isinstance(x, str) for x in inputs[0])
    ):
        return await predict(_parse(S.PredictRequest, body), request)
    return await embed(_parse(S.EmbedRequest, body), request)


async def _text_classification(body: S.TextClassificationRequest, request: Request) -> Response:
    _check_classifier(request)
    result, headers, state = await infer(request, Task.CLASSIFY, body.inputs, body.truncate, body.truncation_direction)
    params = body.parameters
    return JSON(
        _predictions(state, one_tensor(result.outputs), params.function_to_apply or "softmax", params.top_k),
        headers=headers,
    )


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``model`` from a body read by hand, its errors reported as FastAPI reports a declared body's."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


@router.post(
    "/tokenize",
    response_model=list[list[S.SimpleToken]],
    responses=_ERRORS,
    tags=["TEI"],
    summary="Tokens with character offsets",
)
async def tokenize(body: S.TokenizeRequest, request: Request) -> Response:
    state = ready_state(request)
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not texts:
        raise E.empty("the input is empty")
    if len(texts) > state.settings.max_inputs_per_request:
        raise E.too_many_inputs(len(texts), state.settings.max_inputs_per_request)
    assert state.batcher is not None
    content = await state.batcher.run_in_tokenizer_pool(
        _tokens_json, state.loaded_model.tokenizer, texts, body.add_special_tokens
    )
    return Response(content, media_type="application/json")


_TOKENS_PER_RENDER = 4096


def _tokens_json(tokenizer: Tokenizer, texts: list[str], special: bool) -> bytes:
    """The /tokenize body (TEI's SimpleToken lists), built and rendered a slice of tokens at a time.

    A maximal body (2 MB of text, ~360,000 tokens, ~26 MB of JSON) built whole, as one list of dicts rendered in
    one call, would hold the GIL, and with it the event loop and every other request, for the whole render: the
    serializer is native code that keeps the GIL until it returns, and 360,000 long-lived dicts set off full garbage
    collections (docs/experiments/tokenize_stall.py measures the stall). Slices of a few thousand tokens are rendered
    and dropped before the next is built, so the longest hold is one slice's or one tokenizer call's."""
    parts: list[bytes] = [b"["]
    for i, (text, enc) in enumerate(zip(texts, tokenizer.encodings(texts, special))):
        # enc.tokens is not read: a non-special token's text is its span of the input, and fetching all token
        # strings from Rust costs as much again as the offsets.
        spans = zip(enc.ids, enc.offsets, enc.special_tokens_mask)
        parts += (
            b"," if i else b"",
            _json_list(
                {
                    "id": tid,
                    "text": tokenizer.id_to_token(tid) if sp else text[a:b],
                    "special": bool(sp),
                    "start": None if sp else a,
                    "stop": None if sp else b,
                }
                for tid, (a, b), sp in spans
            ),
        )
    parts.append(b"]")
    return b"".join(parts)


def _json_list(items: Iterator[Any]) -> bytes:
    """``render_json(list(items))``, built and rendered _TOKENS_PER_RENDER items at a time."""
    slices = []
    while chunk := list(itertools.islice(items, _TOKENS_PER_RENDER)):
        slices.append(render_json(chunk)[1:-1])
    return b"[" + b",".join(slices) + b"]"


@router.post("/decode", response_model=list[str], responses=_ERRORS, tags=["TEI"], summary="Token ids back to text")
async def decode(body: S.DecodeRequest, request: Request) -> Response:
    state = ready_state(request)
    _, seqs = split_inputs(body.ids)
    seqs = seqs or []
    if not seqs or not any(seqs):
        raise E.empty("no token ids to decode")
    if len(seqs) > state.settings.max_inputs_per_request:
        raise E.too_many_inputs(len(seqs), state.settings.max_inputs_per_request)
    assert state.batcher is not None and state.backend is not None
    for i, seq in enumerate(seqs):
        check_vocabulary(seq, i, state.backend.vocab_size)  # InvalidInput: 422 through the batcher-error handler
    tokenizer = state.loaded_model.tokenizer
    texts = await state.batcher.run_in_tokenizer_pool(
        lambda: [tokenizer.decode(s, skip_special_tokens=body.skip_special_tokens) for s in seqs]
    )
    return JSON(texts)


def _model_card(state: ServiceState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": int(state.ready_since or 0),
        "owned_by": "ultrafastbert-serve",
    }


@router.get(
    "/v1/models",
    response_model=S.OpenAIModelList,
    responses=_OPENAI_ERRORS,
    tags=["OpenAI"],
    summary="OpenAI-compatible model list: the one model this server serves",
)
@router.get(
    "/models", response_model=S.OpenAIModelList, responses=_OPENAI_ERRORS, tags=["OpenAI"], include_in_schema=False
)
async def list_models(request: Request) -> Response:
    return JSON({"object": "list", "data": [_model_card(ready_state(request))]})


@router.get(
    "/v1/models/{model_id:path}",
    response_model=S.OpenAIModel,
    responses={**_OPENAI_ERRORS, 404: {"model": S.OpenAIErrorResponse, "description": "No such model"}},
    tags=["OpenAI"],
    summary="OpenAI-compatible model lookup",
)
async def get_model(model_id: str, request: Request) -> Response:
    state = ready_state(request)
    if model_id != state.model_name:
        raise E.ServiceError(
            404,
            f"model {model_id!r} is not served here (this server serves {state.model_name!r})",
            "model_not_found",
            param="model",
        )
    return JSON(_model_card(state))


@router.get(
    "/health",
    tags=["Probes"],
    summary="Liveness: 200 unless the model failed to start",
    responses={503: {"model": S.ErrorResponse, "description": "The model failed to start: it cannot serve"}},
)
@router.get("/ping", tags=["Probes"], summary="Liveness under SageMaker's name (as TEI)")
@router.get("/", tags=["Probes"], summary="Liveness on the root (as TEI)")
async def health(request: Request) -> Response:
    """200 while the model loads, serves or drains (a liveness probe must not restart a replica that is still
    warming up or finishing its work); 503 once it has failed to start, since it never will serve."""
    state = state_of(request)
    if state.phase == Phase.FAILED:
        return JSON(
            E.error_body(f"unhealthy: the model failed to start ({state.error})", "unhealthy", status=503),
            status_code=503,
        )
    return JSON({"status": "ok"})


@router.get(
    "/ready",
    tags=["Probes"],
    summary="Readiness: 200 once the model is loaded and warm",
    responses={503: {"model": S.ErrorResponse, "description": "Loading, failed or shutting down"}},
)
async def ready(request: Request) -> Response:
    state = state_of(request)
    if state.ready:
        return JSON({"status": "ready"})
    msg = f"not ready: {state.phase}" + (f" ({state.error})" if state.error else "")
    return JSON(E.error_body(msg, "unhealthy", status=503), status_code=503)


@router.get("/metrics", tags=["Probes"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", tags=["Probes"], summary="Model, shape, neuron usage, kernel and every limit")
async def info(request: Request) -> dict[str, Any]:
    return build_info(state_of(request))
