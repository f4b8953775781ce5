"""From a parsed request to the batcher and back: the input unions split, the per-request limits checked, large
OpenAI requests submitted in slices, and the whole call cancelled when the client disconnects (its queued inputs
are withdrawn before they cost compute). The routes (service/routes.py) only translate shapes around :func:`infer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import torch
from fastapi import Request

from engine.backend import Outputs, Task
from engine.batcher import Result, check_vocabulary
from engine.errors import EmptyInput, InputTooLong, Overloaded
from service import errors as E
from service.state import ServiceState

# Slices of one large OpenAI request that wait in the batcher's queue at once: enough to keep the workers fed
# between slices, few enough that requests arriving meanwhile are queued after at most this many slices.
SLICES_IN_FLIGHT = 2


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody will read the answer."""


def state_of(request: Request) -> ServiceState:
    return request.app.state.service


def ready_state(request: Request) -> ServiceState:
    state = state_of(request)
    if not state.ready or state.batcher is None:
        raise E.not_ready(f"the model is not ready (state: {state.phase})")
    return state


def split_inputs(inputs: Any) -> tuple[list[str] | None, list[list[int]] | None]:
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


async def infer(
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
    state = ready_state(request)
    texts, ids = split_inputs(inputs)
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
        outputs=torch.cat([one_tensor(o) for o in outputs])
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


def one_tensor(outputs: Outputs) -> torch.Tensor:
    """The outputs of every task but EMBED_ALL: one tensor, a row per input."""
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"expected one tensor of outputs, got {type(outputs).__name__}")
    return outputs


def per_input(outputs: Outputs) -> list[torch.Tensor]:
    """The outputs of EMBED_ALL: a tensor per input."""
    if not isinstance(outputs, list):
        raise TypeError(f"expected a tensor per input, got {type(outputs).__name__}")
    return outputs
