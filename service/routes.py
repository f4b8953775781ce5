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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.backend import Outputs, Task
from engine.batcher import Result, check_vocabulary
from engine.errors import EmptyInput, InputTooLong, Overloaded
from engine.tokenizer import Tokenizer
from service import __version__
from service import errors as E
from service import schemas as S
from service.metrics import CONTENT_TYPE_LATEST
from service.responses import JSON, render_json
from service.state import Phase, ServiceState, kernel_info

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

# Slices of one large OpenAI request that wait in the batcher's queue at once: enough to keep the workers fed
# between slices, few enough that requests arriving meanwhile are queued after at most this many slices.
SLICES_IN_FLIGHT = 2


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody will read the answer."""


def _state(request: Request) -> ServiceState:
    return request.app.state.service


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


async def _infer(
    request: Request,
    task: Task,
    inputs: Any,
    truncate: bool | None,
    direction: str,
    *,
    max_inputs: int | None = None,
    param: str = "inputs",
) -> tuple[Result, dict[str, str], ServiceState]:
    """Run ``inputs`` through the batcher; more than ``max_inputs_per_request`` (allowed up to ``max_inputs``)
    go in slices (:func:`_submit_in_slices`)."""
    state = _ready_state(request)
    texts, ids = _split_inputs(inputs)
    n = len(texts if texts is not None else ids or [])
    if n == 0:
        raise E.empty("the input is empty", param=param)
    limit = max_inputs or state.settings.max_inputs_per_request
    if n > limit:
        raise E.too_many_inputs(n, limit, param=param)
    arrival = request.scope.get("state", {}).get("t_arrival", time.monotonic())
    deadline = arrival + state.settings.request_timeout_s
    try:
        result = await _cancellable(
            request,
            _submit_in_slices(
                state,
                task,
                texts,
                ids,
                truncate=state.settings.auto_truncate if truncate is None else truncate,
                direction=direction.lower(),
                deadline=deadline,
            ),
        )
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


async def _submit_in_slices(
    state: ServiceState,
    task: Task,
    texts: list[str] | None,
    ids: list[list[int]] | None,
    *,
    truncate: bool,
    direction: str,
    deadline: float,
) -> Result:
    """One batcher submission, or for more inputs than ``max_inputs_per_request``, slices of that size with at most
    :data:`SLICES_IN_FLIGHT` queued at a time. Each slice is an ordinary submission under every queue, token and
    concurrency limit, so a 2,048-input request never holds more than a few slices' share of the queue: requests
    that arrive meanwhile are served between its slices instead of after all of it.

    The first slice meets the queue as any request does (a full queue: 429). A later slice that finds it full waits
    for room until the deadline, since the request already holds answers. Times in the result are summed over the
    slices."""
    batcher = state.batcher
    assert batcher is not None
    size = state.settings.max_inputs_per_request
    if texts is not None:
        n_inputs = len(texts)
    elif ids is not None:
        n_inputs = len(ids)
    else:
        raise ValueError("a submission needs texts or token ids")
    if n_inputs <= size:
        return await batcher.submit(
            task, texts=texts, token_ids=ids, truncate=truncate, direction=direction, deadline=deadline
        )
    _check_whole_request(state, texts, ids)  # errors that name an input by its index, before any slice runs
    starts = range(0, n_inputs, size)
    window = asyncio.Semaphore(SLICES_IN_FLIGHT)

    async def one(start: int) -> Result:
        end = start + size
        delay = 0.01
        async with window:
            while True:
                try:
                    return await batcher.submit(
                        task,
                        texts=texts[start:end] if texts is not None else None,
                        token_ids=ids[start:end] if ids is not None else None,
                        truncate=truncate,
                        direction=direction,
                        deadline=deadline,
                    )
                except Overloaded:
                    if start == 0 or time.monotonic() + delay >= deadline:
                        raise
                except InputTooLong as exc:  # its index counts from the slice's start
                    raise InputTooLong(start + (exc.index or 0), exc.n_tokens, exc.max_length) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.25)

    slices = [asyncio.ensure_future(one(start)) for start in starts]
    try:
        results = await asyncio.gather(*slices)
    except BaseException:
        for t in slices:
            t.cancel()  # their queued inputs are withdrawn
        await asyncio.gather(*slices, return_exceptions=True)
        raise
    outputs = [r.outputs for r in results]
    return Result(
        outputs=torch.cat([_one_tensor(o) for o in outputs])
        if isinstance(outputs[0], torch.Tensor)
        else [row for rows in outputs for row in rows],  # Task.EMBED_ALL: a tensor per input
        token_counts=[c for r in results for c in r.token_counts],
        tokenization_s=sum(r.tokenization_s for r in results),
        queue_s=sum(r.queue_s for r in results),
        inference_s=sum(r.inference_s for r in results),
    )


def _check_whole_request(state: ServiceState, texts: list[str] | None, ids: list[list[int]] | None) -> None:
    """The batcher's per-input checks that need no tokenizer, with indexes over the whole request."""
    if texts is not None:
        if "" in texts:
            raise EmptyInput(f"input {texts.index('')} is an empty string")
        return
    assert ids is not None and state.backend is not None
    for i, seq in enumerate(ids):
        if not seq:
            raise EmptyInput(f"input {i} is an empty list of token ids")
        check_vocabulary(seq, i, state.backend.vocab_size)


def _one_tensor(outputs: Outputs) -> torch.Tensor:
    """The outputs of every task but EMBED_ALL: one tensor, a row per input."""
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"expected one tensor of outputs, got {type(outputs).__name__}")
    return outputs


def _per_input(outputs: Outputs) -> list[torch.Tensor]:
    """The outputs of EMBED_ALL: a tensor per input."""
    if not isinstance(outputs, list):
        raise TypeError(f"expected a tensor per input, got {type(outputs).__name__}")
    return outputs


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
    state = _ready_state(request)
    if not state.labels:
        raise E.ServiceError(400, f"model {state.model_name!r} has no classification head", "unsupported")
    return state


def _check_dimensions(request: Request, dimensions: int | None) -> None:
    hidden = _ready_state(request).loaded_model.config.hidden_size
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
    result, headers, state = await _infer(
        request,
        Task.EMBED,
        body.input,
        None,
        "right",
        max_inputs=_state(request).settings.max_inputs_per_openai_request,
        param="input",
    )
    vectors = _shape_embeddings(_one_tensor(result.outputs), True, body.dimensions)
    enc = _b64 if body.encoding_format == "base64" else (lambda v: v.tolist())
    data = [{"object": "embedding", "embedding": enc(v), "index": i} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens}
    return JSON({"object": "list", "data": data, "model": state.model_name, "usage": usage}, headers=headers)


@router.post(
    "/embed", response_model=list[list[float]], responses=_ERRORS, tags=["TEI"], summary="TEI-compatible embeddings"
)
async def embed(body: S.EmbedRequest, request: Request) -> Response:
    _check_dimensions(request, body.dimensions)
    result, headers, _ = await _infer(request, Task.EMBED, body.inputs, body.truncate, body.truncation_direction)
    vectors = _shape_embeddings(_one_tensor(result.outputs), body.normalize, body.dimensions)
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
    result, headers, _ = await _infer(request, Task.EMBED_ALL, body.inputs, body.truncate, body.truncation_direction)
    states = _per_input(result.outputs)
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
    result, headers, state = await _infer(request, Task.CLASSIFY, body.inputs, body.truncate, body.truncation_direction)
    scores = "none" if body.raw_scores else "softmax"
    return JSON(_predictions(state, _one_tensor(result.outputs), scores, body.top_k), headers=headers)


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
    result, headers, state = await _infer(request, Task.CLASSIFY, texts, body.truncate, body.truncation_direction)
    preds = _predictions(state, _one_tensor(result.outputs), "none" if body.raw_scores else "softmax", None)
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
    result, headers, state = await _infer(request, Task.CLASSIFY, body.inputs, body.truncate, body.truncation_direction)
    params = body.parameters
    return JSON(
        _predictions(state, _one_tensor(result.outputs), params.function_to_apply or "softmax", params.top_k),
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
    state = _ready_state(request)
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
    return JSON({"object": "list", "data": [_model_card(_ready_state(request))]})


@router.get(
    "/v1/models/{model_id:path}",
    response_model=S.OpenAIModel,
    responses={**_OPENAI_ERRORS, 404: {"model": S.OpenAIErrorResponse, "description": "No such model"}},
    tags=["OpenAI"],
    summary="OpenAI-compatible model lookup",
)
async def get_model(model_id: str, request: Request) -> Response:
    state = _ready_state(request)
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
    state = _state(request)
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
    state = _state(request)
    if state.ready:
        return JSON({"status": "ready"})
    msg = f"not ready: {state.phase}" + (f" ({state.error})" if state.error else "")
    return JSON(E.error_body(msg, "unhealthy", status=503), status_code=503)


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
            "name": state.model_name,
            "path": str(state.loaded.path),
            "layout": c.layout,
            "source_format": getattr(state.loaded, "source_format", None),
            "hidden_size": c.hidden_size,
            "num_layers": c.num_layers,
            "num_heads": c.num_heads,
            "ffn": c.ffn,
            "fff_trees": c.fff_trees if c.ffn == "fff" else None,
            "fff_depth": c.fff_depth if c.ffn == "fff" else None,
            "dense_ffn_layers": c.dense_ffn_layers,
            "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings,
            "pooling": c.pooling,
            "normalize": c.normalize,
            "labels": c.labels,
            "weight_dtype": s.weight_dtype,
            "compute_dtype": s.compute_dtype,
            "compute_native": state.compute_native,
        }
    npt = [
        {"layer": i, "evaluated": e, "dense": d, "fraction": (e / d) if d else None}
        for i, (e, d) in enumerate(state.neurons_per_token)
    ]
    total_e, total_d = state.neurons_for(1)
    return {
        **_tei_info(state),
        "version": __version__,
        "state": state.phase,
        "error": state.error,
        "model": model,
        "neurons_per_token": {
            "per_layer": npt,
            "evaluated": total_e,
            "dense": total_d,
            "fraction": (total_e / total_d) if total_d else None,
        },
        "cpu": state.cpu.to_dict(),
        "kernel": {
            "compiled": kernel.compiled,
            "name": kernel.name,
            "description": kernel.describe(),
            "warning": None if kernel.compiled else f"SLOW FALLBACK: {kernel.describe()}",
        },
        "limits": {
            "max_batch_tokens": s.max_batch_tokens,
            "max_batch_requests": s.max_batch_requests,
            "max_batch_wait_ms": s.max_batch_wait_ms,
            "max_queued_inputs": s.max_queued_inputs,
            "max_queued_tokens": s.max_queued_tokens,
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_inputs_per_request": s.max_inputs_per_request,
            "max_inputs_per_openai_request": s.max_inputs_per_openai_request,
            "max_input_tokens": state.max_input_tokens or s.max_input_tokens,
            "auto_truncate": s.auto_truncate,
            "payload_limit_bytes": s.payload_limit,
            "request_timeout_s": s.request_timeout_s,
            "shutdown_grace_s": s.shutdown_grace_s,
            "shutdown_delay_s": s.shutdown_delay_s,
            "keep_alive_timeout_s": s.keep_alive_timeout_s,
        },
        "inference": {
            "workers": s.inference_workers,
            "torch_threads_per_worker": (state.batcher.limits.threads_per_worker if state.batcher is not None else None)
            or torch.get_num_threads(),
        },
        "auth": {
            "api_key_required": s.api_key is not None,
            "metrics_require_key": s.api_key is not None and s.metrics_require_key,
        },
    }


def _tei_info(state: ServiceState) -> dict[str, Any]:
    """TEI's ``/info`` keys (router/src/lib.rs ``Info``). ``model_type`` has one key in TEI; a model here that also
    has a classification head reports ``classifier`` beside ``embedding``, since it serves both."""
    s = state.settings
    model_type: dict[str, Any] = {}
    model_id = None
    if state.loaded is not None:
        c = state.loaded.config
        model_id = str(getattr(state.loaded, "name", None) or state.model_name)
        model_type["embedding"] = {"pooling": c.pooling}
        if c.labels:
            model_type["classifier"] = {
                "id2label": {str(i): lab for i, lab in enumerate(c.labels)},
                "label2id": {lab: i for i, lab in enumerate(c.labels)},
            }
    return {
        "model_id": model_id,
        "model_sha": None,
        "model_dtype": s.compute_dtype,
        "served_model_name": state.model_name,
        "model_type": model_type,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_input_length": state.max_input_tokens or s.max_input_tokens,
        "max_batch_tokens": s.max_batch_tokens,
        "max_batch_requests": s.max_batch_requests,
        "max_client_batch_size": s.max_inputs_per_request,
        "auto_truncate": s.auto_truncate,
        "tokenization_workers": s.tokenizer_workers,
        "sha": None,
        "docker_label": None,
    }
