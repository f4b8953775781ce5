"""Dynamic batching between the asyncio front end and the inference worker thread(s) that run the model.

Why this shape (TEI's router/queue/backend split and its token budget):

* Tokenization runs in a small thread pool, never on the event loop: a 100k-character input must not stall
  every other connection.
* Inputs, not requests, are the unit of batching. A request's inputs may land in different batches; each
  carries its request and position so results are routed back exactly.
* A batch is bounded by a **token budget** counted in real tokens, and by a cap on the number of sequences.
  The model computes packed batches (no padding, :func:`engine.packing.pack`), so a mix of lengths costs no more
  than sorted lengths would: inputs are taken oldest first (:func:`first_fit`), which is the fair order and the
  one that keeps tail latency down (docs/serving.md).
* The worker waits a little (``max_wait_s``) for a batch to grow only when it is busy; an input that arrives
  at an idle worker is dispatched at once, so a lone request pays no batching latency.
* The queue is bounded in inputs and in tokens; beyond that :class:`Overloaded` is raised immediately
  (the service answers 429) rather than letting memory and latency grow without bound.
* A request that was cancelled (client went away) or whose deadline passed is removed before it costs
  compute. A batch whose forward raises fails only the requests that had inputs in it.

This module must not import the ``service`` package: metrics reach the service through the
:class:`BatchObserver` callback.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.backend import Backend, Outputs, Task
from engine.errors import (
    BatcherError,
    DeadlineExceeded,
    EmptyInput,
    InferenceFailed,
    InputTooLong,
    InvalidInput,
    Overloaded,
    ShuttingDown,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BatcherLimits:
    """Every bound the batcher enforces; the service fills it from settings and shows it in /info."""

    max_batch_tokens: int = 16384  # tokens (summed over the inputs) per forward pass
    max_batch_requests: int = 64  # sequences per forward pass
    max_wait_s: float = 0.002  # how long a busy worker lets a batch grow
    max_queued_inputs: int = 1024
    max_queued_tokens: int = 262144
    max_concurrent_requests: int = 512  # admitted requests, including those still tokenizing
    max_input_tokens: int = 512
    tokenizer_workers: int = 2
    record_leaves: bool = True
    inference_workers: int = 1  # threads that each run whole forward passes, on different batches at once
    # torch intra-op threads of each worker while all are busy; one running alone uses all workers' threads
    threads_per_worker: int | None = None


def worker_threads(workers: int, torch_threads: int | None = None) -> int | None:
    """Torch threads each of ``workers`` inference workers gets: ``torch_threads`` if given, else an equal share
    of torch's default; None (leave torch's setting alone) for a single worker."""
    if torch_threads:
        return torch_threads
    return max(1, torch.get_num_threads() // workers) if workers > 1 else None


def check_vocabulary(seq: Sequence[int], index: int, vocab_size: int) -> None:
    """:class:`InvalidInput` naming the first id of input ``index`` outside ``0 .. vocab_size - 1``."""
    bad = next((t for t in seq if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidInput(f"input {index} has token id {bad}, outside the vocabulary (0..{vocab_size - 1})", index)


def first_fit(lengths: Sequence[int], max_inputs: int, max_tokens: int) -> list[int]:
    """Indices, ascending, of the queued inputs (``lengths`` in arrival order) that one batch takes: the oldest
    always (even alone over the token budget: it must run some time), then each later input that still fits both
    budgets. An input skipped for its length is the oldest soon enough, so nothing starves."""
    if not lengths:
        return []
    chosen, tokens = [0], lengths[0]
    for i in range(1, len(lengths)):
        if len(chosen) >= max_inputs:
            break
        if tokens + lengths[i] <= max_tokens:
            chosen.append(i)
            tokens += lengths[i]
    return chosen


@dataclass
class BatchStats:
    """Handed to the observer after every forward pass (from the worker thread)."""

    task: Task
    size: int
    tokens: int  # summed over the inputs: what the packed forward computes
    inference_s: float
    lengths: list[int]
    leaf_counts: list[torch.Tensor] | None = None  # per layer: [trees, leaves] visit counts of this batch
    error: str | None = None


class BatchObserver(Protocol):
    def on_batch(self, stats: BatchStats) -> None: ...


@dataclass
class Result:
    """One request's outputs, in input order, and where its time went."""

    outputs: Outputs  # [n_inputs, dim] float32; Task.EMBED_ALL: a [len_i, dim] tensor per input
    token_counts: list[int]
    tokenization_s: float
    queue_s: float
    inference_s: float

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(eq=False)
class _Request:
    task: Task
    n: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Result]
    deadline: float | None
    enqueued: float
    token_counts: list[int]
    tokenization_s: float
    rows: list[torch.Tensor | None] = field(default_factory=list)
    remaining: int = 0
    first_start: float | None = None
    finished: bool = False  # resolved, failed, cancelled or expired: its queued items are garbage
    # the submitter's context variables (the service's request id among them): lines the worker logs about this
    # request alone are logged inside it
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


@dataclass(eq=False)
class _Item:
    req: _Request
    index: int
    ids: list[int]
    seq: int


# ---------------------------------------------------------------------------------------------------- batcher


def _resolve(fut: asyncio.Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class Batcher:
    """Queue + inference worker thread(s). Create it, ``start()`` it, ``await submit(...)`` from the event loop."""

    def __init__(
        self,
        backend: Backend,
        limits: BatcherLimits | None = None,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.limits = limits or BatcherLimits()
        self.observer = observer
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[int, _Item] = {}  # insertion order == arrival order
        self._queued_tokens = 0
        self._seq = itertools.count()
        self._admitted = 0  # requests between admission and their answer
        # high-water marks since the last reset_peaks(): what the queue bounds actually held under load
        self._peak_queue_depth = 0
        self._peak_queued_tokens = 0
        self._peak_admitted = 0
        self._inflight_batches = 0
        self._inflight_ids: set[int] = set()
        self._accepting = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._tok_pool = ThreadPoolExecutor(
            max_workers=max(1, self.limits.tokenizer_workers), thread_name_prefix="ufb-tokenize"
        )

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._accepting = True
        n = max(1, self.limits.inference_workers)
        self._threads = [
            threading.Thread(target=self._worker, name="ufb-inference" + (f"-{i}" if n > 1 else ""), daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def stop_accepting(self) -> None:
        """First step of shutdown: new work gets :class:`ShuttingDown`; admitted work continues."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._admitted == 0 and not self._pending and self._inflight_batches == 0

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting and wait for admitted work to finish; False if the grace period ran out."""
        self.stop_accepting()
        end = self._clock() + timeout_s
        while not self.idle:
            if self._clock() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    def stop(self) -> None:
        """Stop the worker; whatever is still queued fails with :class:`ShuttingDown`."""
        self._accepting = False
        with self._cond:
            self._stopping = True
            leftovers = list(self._pending.values())
            self._pending.clear()
            self._queued_tokens = 0
            self._cond.notify_all()
        for item in leftovers:
            self._fail(item.req, ShuttingDown("the service is shutting down"))
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- introspection (metrics gauges)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def inflight_batches(self) -> int:
        return self._inflight_batches

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet answered (tokenizing, queued or in a forward pass)."""
        return self._admitted

    def peaks(self) -> dict[str, int]:
        """High-water marks of queue depth (inputs), queued tokens and admitted requests since the last reset."""
        with self._cond:
            return {
                "queue_depth": self._peak_queue_depth,
                "queued_tokens": self._peak_queued_tokens,
                "admitted": self._peak_admitted,
            }

    def reset_peaks(self) -> None:
        with self._cond:
            self._peak_queue_depth = len(self._pending)
            self._peak_queued_tokens = self._queued_tokens
            self._peak_admitted = self._admitted

    # -------------------------------------------------------------- front end

    async def run_in_tokenizer_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Other tokenizer work (e.g. /tokenize) shares the bounded pool instead of the loop's default one."""
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, *args)

    async def submit(
        self,
        task: Task,
        *,
        texts: Sequence[str] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        truncate: bool = False,
        direction: str = "right",
        deadline: float | None = None,
    ) -> Result:
        """Tokenize (off the loop), enqueue, and wait for every input's output.

        ``deadline`` is on this batcher's clock (``time.monotonic`` by default). Cancelling the awaiting task
        withdraws the request's queued inputs, so a client that went away costs no compute.
        """
        if not self._accepting:
            raise ShuttingDown("the service is not accepting requests (starting or shutting down)")
        n = len(texts) if texts is not None else len(token_ids or ())
        if n == 0:
            raise EmptyInput("the input is empty")
        with self._cond:
            if self._admitted >= self.limits.max_concurrent_requests:
                raise Overloaded(f"too many concurrent requests (limit {self.limits.max_concurrent_requests})")
            if len(self._pending) + n > self.limits.max_queued_inputs:
                raise Overloaded(
                    f"the queue is full ({len(self._pending)} inputs waiting, limit {self.limits.max_queued_inputs})"
                )
            self._admitted += 1
            self._peak_admitted = max(self._peak_admitted, self._admitted)
        try:
            return await self._submit_admitted(task, texts, token_ids, truncate, direction, deadline)
        finally:
            with self._cond:
                self._admitted -= 1

    async def _submit_admitted(
        self,
        task: Task,
        texts: Sequence[str] | None,
        token_ids: Sequence[Sequence[int]] | None,
        truncate: bool,
        direction: str,
        deadline: float | None,
    ) -> Result:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        max_len = self.limits.max_input_tokens
        if texts is not None:
            if any(t == "" for t in texts):
                raise EmptyInput(f"input {next(i for i, t in enumerate(texts) if t == '')} is an empty string")
            ids = await loop.run_in_executor(
                self._tok_pool,
                lambda: self.backend.tokenize(texts, max_length=max_len, truncate=truncate, direction=direction),
            )
        else:
            ids = self._check_ids(token_ids or (), truncate, direction)
        tokenization_s = time.perf_counter() - t0
        now = self._clock()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("the request's deadline passed before it was queued")

        fut: asyncio.Future[Result] = loop.create_future()
        counts = [len(x) for x in ids]
        req = _Request(
            task=task,
            n=len(ids),
            loop=loop,
            future=fut,
            deadline=deadline,
            enqueued=now,
            token_counts=counts,
            tokenization_s=tokenization_s,
            rows=[None] * len(ids),
            remaining=len(ids),
        )
        total = sum(counts)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the service is shutting down")
            if len(self._pending) + req.n > self.limits.max_queued_inputs:
                raise Overloaded(
                    f"the queue is full ({len(self._pending)} inputs waiting, limit {self.limits.max_queued_inputs})"
                )
            if self._queued_tokens + total > self.limits.max_queued_tokens:
                raise Overloaded(
                    f"the queue is full ({self._queued_tokens} tokens waiting, limit {self.limits.max_queued_tokens})"
                )
            for i, x in enumerate(ids):
                seq = next(self._seq)
                self._pending[seq] = _Item(req, i, list(x), seq)
            self._queued_tokens += total
            self._peak_queue_depth = max(self._peak_queue_depth, len(self._pending))
            self._peak_queued_tokens = max(self._peak_queued_tokens, self._queued_tokens)
            self._cond.notify()
        try:
            if deadline is None:
                return await fut
            return await asyncio.wait_for(fut, timeout=max(0.0, deadline - self._clock()))
        except TimeoutError:
            self._withdraw(req)
            raise DeadlineExceeded("the request's deadline passed before its inference finished") from None
        except asyncio.CancelledError:
            self._withdraw(req)
            raise

    def _check_ids(self, token_ids: Sequence[Sequence[int]], truncate: bool, direction: str) -> list[list[int]]:
        vocab, max_len = self.backend.vocab_size, self.limits.max_input_tokens
        out: list[list[int]] = []
        for i, seq in enumerate(token_ids):
            if len(seq) == 0:
                raise EmptyInput(f"input {i} is an empty list of token ids")
            check_vocabulary(seq, i, vocab)
            if len(seq) > max_len:
                if not truncate:
                    raise InputTooLong(i, len(seq), max_len)
                seq = seq[:max_len] if direction == "right" else seq[len(seq) - max_len :]
            out.append(list(seq))
        return out

    def _withdraw(self, req: _Request) -> None:
        """The caller stopped waiting: free its queue slots now rather than at the next batch."""
        with self._cond:
            req.finished = True
            self._drop_items_locked(req)

    def _drop_items_locked(self, req: _Request) -> None:
        for seq in [s for s, it in self._pending.items() if it.req is req]:
            self._queued_tokens -= len(self._pending.pop(seq).ids)

    # -------------------------------------------------------------- worker

    def _worker(self) -> None:
        """One inference worker. Why several (``inference_workers``): torch's intra-op threads meet at a barrier
        after every op, so when the event loop or the tokenizers take a core for a moment the whole op waits; two
        single-threaded workers on two cores, each on its own batch, lose only their own time (docs/serving.md).
        Threads are set per batch, per worker thread (OpenMP's and MKL's counts are per calling thread): all
        workers' threads when this one runs alone, an equal share when others run too."""
        idle = True
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    idle = True
                    self._cond.wait()
                if self._stopping:
                    return
                if not idle and self.limits.max_wait_s > 0:
                    self._let_batch_grow_locked()
                self._expire_locked()
                batch = self._take_batch_locked()
                if batch:
                    self._inflight_batches += 1
                    self._inflight_ids.add(id(batch))
                    busy = self._inflight_batches
                idle = False
            if batch:
                if self.limits.threads_per_worker and len(self._threads) > 1:
                    # a worker that runs alone takes every worker's threads (low load keeps one-worker latency)
                    total = self.limits.threads_per_worker * len(self._threads)
                    torch.set_num_threads(max(1, total // busy))
                try:
                    self._run(batch)
                except Exception as exc:  # noqa: BLE001 -- post-processing bug: fail the batch, keep serving
                    log.exception("batch post-processing failed")
                    for req in {it.req for it in batch}:
                        if not req.finished:
                            self._withdraw(req)
                            self._fail(req, InferenceFailed(f"internal error after inference: {exc!r}"))
                finally:
                    self._end_inflight(batch)

    def _let_batch_grow_locked(self) -> None:
        oldest = next(iter(self._pending.values()))
        until = oldest.req.enqueued + self.limits.max_wait_s
        while not self._stopping:
            if (
                len(self._pending) >= self.limits.max_batch_requests
                or self._queued_tokens >= self.limits.max_batch_tokens
            ):
                return
            remaining = until - self._clock()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _expire_locked(self) -> None:
        now = self._clock()
        dead = {
            it.req
            for it in self._pending.values()
            if it.req.finished or (it.req.deadline is not None and now >= it.req.deadline)
        }
        for req in dead:
            self._drop_items_locked(req)
            if not req.finished:
                self._fail(req, DeadlineExceeded("the request's deadline passed while it was queued"))

    def _take_batch_locked(self) -> list[_Item]:
        """The oldest input's task, oldest first, within the token and size budgets (:func:`first_fit`)."""
        if not self._pending:
            return []
        task = next(iter(self._pending.values())).req.task
        cands = [it for it in self._pending.values() if it.req.task is task]  # arrival order
        chosen = [
            cands[i]
            for i in first_fit(
                [len(it.ids) for it in cands], self.limits.max_batch_requests, self.limits.max_batch_tokens
            )
        ]
        for it in chosen:
            del self._pending[it.seq]
            self._queued_tokens -= len(it.ids)
        return chosen

    def _run(self, batch: list[_Item]) -> None:
        task = batch[0].req.task
        lengths = [len(it.ids) for it in batch]
        stats = BatchStats(task=task, size=len(batch), tokens=sum(lengths), inference_s=0.0, lengths=lengths)
        start = self._clock()
        t0 = time.perf_counter()
        for it in batch:
            if it.req.first_start is None:
                it.req.first_start = start
        try:
            try:
                out, leaves = self.backend.forward(task, [it.ids for it in batch], self.limits.record_leaves)
            finally:
                self._end_inflight(batch)  # before answering, so the gauge is right when a client looks
            if len(out) != len(batch):
                raise RuntimeError(f"backend returned {len(out)} rows for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 -- a bad batch must not kill the worker
            stats.inference_s = time.perf_counter() - t0
            stats.error = type(exc).__name__
            log.exception("inference failed for a batch of %d inputs", len(batch))
            failed = {it.req for it in batch}
            self._notify(stats)
            with self._cond:
                for req in failed:
                    self._drop_items_locked(req)
            for req in failed:
                self._fail(
                    req,
                    InferenceFailed(f"inference failed for the batch this request was in: {type(exc).__name__}: {exc}"),
                )
            return
        stats.inference_s = time.perf_counter() - t0
        try:
            stats.leaf_counts = self._leaf_counts(leaves)
        except Exception:  # noqa: BLE001 -- leaf metrics are diagnostics, never worth a failed request
            log.exception("could not count FFF leaves")
        end = self._clock()
        self._notify(stats)  # before answering: a client that reads /metrics next sees its own batch
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu()
            finite = torch.isfinite(out).all(dim=1).tolist()
        else:
            out = [o.detach().cpu() for o in out]
            finite = [bool(torch.isfinite(o).all()) for o in out]
        done: list[_Request] = []
        broken: list[tuple[_Request, int]] = []
        with self._cond:  # a request's inputs may sit in batches that other workers finish at the same moment
            for row, ok, it in zip(out, finite, batch):
                req = it.req
                if req.finished:
                    continue
                if not ok:  # no answer (and JSON has no NaN): only this input's request fails, not its batch's
                    req.finished = True
                    self._drop_items_locked(req)
                    broken.append((req, it.index))
                    continue
                req.rows[it.index] = row.clone()
                req.remaining -= 1
                if req.remaining == 0:
                    req.finished = True
                    done.append(req)
        for req, index in broken:
            req.context.run(log.error, "the model produced non-finite values for input %d of a request", index)
            self._fail(
                req, InferenceFailed(f"the model produced non-finite values (NaN or infinity) for input {index}")
            )
        for req in done:
            rows: list[torch.Tensor] = req.rows  # type: ignore[assignment]  # every slot is filled by now
            result = Result(
                outputs=rows if req.task is Task.EMBED_ALL else torch.stack(rows),
                token_counts=req.token_counts,
                tokenization_s=req.tokenization_s,
                queue_s=(req.first_start or end) - req.enqueued,
                inference_s=end - (req.first_start or end),
            )
            req.loop.call_soon_threadsafe(_resolve, req.future, result)

    def _end_inflight(self, batch: list[_Item]) -> None:
        """Idempotent per batch: the forward's end and the worker's safety net both call it."""
        with self._cond:
            if id(batch) in self._inflight_ids:
                self._inflight_ids.discard(id(batch))
                self._inflight_batches -= 1

    def _leaf_counts(self, leaves: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """Per FFF layer ``[K, 2^D]`` visits of each tree's leaves (K from the layer's leaves, so it may differ)."""
        depth = getattr(self.backend, "tree_depth", None)
        if not leaves or depth is None:
            return None
        n_leaves = 2**depth
        counts = []
        for layer in leaves:
            trees = layer.shape[1]
            flat = (layer.long() + torch.arange(trees, dtype=torch.long) * n_leaves).reshape(-1)
            counts.append(torch.bincount(flat, minlength=trees * n_leaves).reshape(trees, n_leaves))
        return counts

    def _notify(self, stats: BatchStats) -> None:
        if self.observer is None:
            return
        try:
            self.observer.on_batch(stats)
        except Exception:  # noqa: BLE001 -- metrics must never take inference down
            log.exception("batch observer failed")

    def _fail(self, req: _Request, exc: BatcherError) -> None:
        req.finished = True
        try:
            req.loop.call_soon_threadsafe(_resolve, req.future, None, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
