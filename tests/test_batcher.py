"""The batcher on a fake backend: routing, budgets, overload, cancellation, deadlines, faults, drain.

A fake backend keeps these tests fast and deterministic (its output is a pure function of each input's ids), and
lets a test hold the worker inside a forward pass (``gate``) to build up a queue on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
import torch
from batcher_support import FakeBackend, Recorder, expected, expected_all, make, run

from engine.backend import Task
from engine.batcher import Batcher, BatcherLimits, first_fit
from engine.errors import (
    DeadlineExceeded,
    EmptyInput,
    InferenceFailed,
    InputTooLong,
    InvalidInput,
    Overloaded,
    ShuttingDown,
)


def test_concurrent_requests_get_their_own_results_and_batches_form() -> None:
    batcher, backend, rec = make(
        BatcherLimits(max_batch_tokens=256, max_batch_requests=16, max_wait_s=0.005, max_input_tokens=64)
    )

    async def main() -> None:
        texts = [["x" * ((i * 7) % 40 + 1), "y" * (i % 5)] for i in range(80)]
        texts = [[t for t in pair if t] for pair in texts]
        backend.gate.clear()  # hold the first batch so that the rest queue up behind it
        tasks = [asyncio.ensure_future(batcher.submit(Task.EMBED, texts=t)) for t in texts]
        await asyncio.sleep(0.05)
        backend.gate.set()
        results = await asyncio.gather(*tasks)
        for t, res in zip(texts, results):
            ids = backend.tokenize(t, max_length=64, truncate=False, direction="right")
            assert torch.equal(res.outputs, expected(ids))
            assert res.token_counts == [len(x) for x in ids]

    try:
        run(main())
    finally:
        batcher.stop()
    assert max(b.size for b in rec.batches) > 1
    for b in rec.batches:
        assert b.size <= 16
        assert b.tokens <= 256 or b.size == 1
        assert b.tokens == sum(b.lengths)


def test_long_requests_are_split_across_batches_in_order() -> None:
    batcher, backend, rec = make(BatcherLimits(max_batch_requests=2, max_input_tokens=64))
    ids = [[5 + i] * (1 + (i * 3) % 7) for i in range(9)]
    try:
        res = run(batcher.submit(Task.EMBED, token_ids=ids))
    finally:
        batcher.stop()
    assert torch.equal(res.outputs, expected(ids))
    assert len(rec.batches) >= 5


def test_tasks_never_share_a_batch() -> None:
    batcher, backend, _ = make()

    async def main() -> None:
        backend.gate.clear()
        a = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[7, 8]]))
        b = asyncio.ensure_future(batcher.submit(Task.CLASSIFY, token_ids=[[7, 8]]))
        c = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[9]]))
        await asyncio.sleep(0.05)
        backend.gate.set()
        ra, rb, rc = await asyncio.gather(a, b, c)
        assert torch.equal(ra.outputs, expected([[7, 8]]))
        assert torch.equal(rb.outputs, expected([[7, 8]], Task.CLASSIFY))
        assert torch.equal(rc.outputs, expected([[9]]))

    try:
        run(main())
    finally:
        batcher.stop()


def test_idle_worker_dispatches_without_waiting() -> None:
    batcher, _, _ = make(BatcherLimits(max_wait_s=1.0, max_input_tokens=64))
    try:
        t0 = time.perf_counter()
        run(batcher.submit(Task.EMBED, texts=["hello"]))
        assert time.perf_counter() - t0 < 0.5
    finally:
        batcher.stop()


def test_queue_full_raises_overloaded_and_recovers() -> None:
    batcher, backend, _ = make(BatcherLimits(max_queued_inputs=4, max_input_tokens=64))

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker holds batch 1; the queue is empty
        queued = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]] * 4))
        await asyncio.sleep(0.02)
        assert batcher.queue_depth == 4
        with pytest.raises(Overloaded):
            await batcher.submit(Task.EMBED, token_ids=[[6]])
        backend.gate.set()
        await asyncio.gather(first, queued)
        assert (await batcher.submit(Task.EMBED, token_ids=[[6]])).outputs.shape == (1, 4)

    try:
        run(main())
    finally:
        batcher.stop()


def test_queued_token_cap() -> None:
    batcher, backend, _ = make(BatcherLimits(max_queued_tokens=10, max_input_tokens=64))

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        with pytest.raises(Overloaded):
            await batcher.submit(Task.EMBED, token_ids=[[5] * 11])
        backend.gate.set()
        await first

    try:
        run(main())
    finally:
        batcher.stop()


def test_cancelled_request_costs_no_compute() -> None:
    batcher, backend, _ = make()

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        doomed = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[777, 777]]))
        await asyncio.sleep(0.02)
        assert batcher.queue_depth == 1
        doomed.cancel()
        await asyncio.sleep(0)
        assert batcher.queue_depth == 0 and batcher.queued_tokens == 0
        backend.gate.set()
        await first
        await batcher.submit(Task.EMBED, token_ids=[[6]])

    try:
        run(main())
    finally:
        batcher.stop()
    assert not any(777 in seq for batch in backend.seen for seq in batch)


def test_deadline_in_queue_gives_timeout_and_no_compute() -> None:
    batcher, backend, _ = make()

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(Task.EMBED, token_ids=[[888]], deadline=time.monotonic() + 0.05)
        backend.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(Task.EMBED, token_ids=[[889]], deadline=time.monotonic() - 1)

    try:
        run(main())
    finally:
        batcher.stop()
    assert not any(888 in seq or 889 in seq for batch in backend.seen for seq in batch)


def test_a_non_finite_output_row_fails_only_its_request() -> None:
    """A row with NaN or infinity is no answer (and JSON cannot carry it): its request gets InferenceFailed, the
    other request in the same batch its rows."""

    class NaNBackend(FakeBackend):
        def forward(self, task: Task, ids: Sequence[Sequence[int]], record_leaves: bool):
            out, leaves = super().forward(task, ids, record_leaves)
            for i, seq in enumerate(ids):
                if 777 in seq:
                    out[i, 1] = float("nan") if 778 in seq else float("inf")
            return out, leaves

    backend = NaNBackend()
    batcher = Batcher(backend, BatcherLimits(max_batch_requests=8, max_input_tokens=64), observer=Recorder())
    batcher.start()

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[4]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        good = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5], [6]]))
        nan = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[9], [777, 778]]))
        inf = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[777]]))
        await asyncio.sleep(0.05)
        backend.gate.set()
        r0, r1, r2, r3 = await asyncio.gather(first, good, nan, inf, return_exceptions=True)
        assert len(backend.seen) == 2 and len(backend.seen[1]) == 5  # the three requests shared one batch
        assert torch.equal(r0.outputs, expected([[4]])) and torch.equal(r1.outputs, expected([[5], [6]]))
        assert isinstance(r2, InferenceFailed) and "non-finite" in str(r2) and "input 1" in str(r2)
        assert isinstance(r3, InferenceFailed) and "input 0" in str(r3)
        assert torch.equal((await batcher.submit(Task.EMBED, token_ids=[[8]])).outputs, expected([[8]]))

    try:
        run(main())
    finally:
        batcher.stop()
    assert batcher.queue_depth == 0


def test_token_level_outputs_route_per_input_and_fail_alone() -> None:
    """Task.EMBED_ALL answers one [len, dim] tensor per input: rows of different lengths reach their request in
    input order even when its inputs are split over batches, never share a forward pass with pooled tasks, and a
    non-finite value in one input's rows fails only that input's request."""

    class TokenBackend(FakeBackend):
        def forward(self, task: Task, ids: Sequence[Sequence[int]], record_leaves: bool):
            out, leaves = super().forward(task, ids, record_leaves)
            if task is Task.EMBED_ALL:
                for i, seq in enumerate(ids):
                    if 777 in seq:
                        out[i][-1, 0] = float("inf")
            return out, leaves

    backend = TokenBackend()
    batcher = Batcher(backend, BatcherLimits(max_batch_requests=3, max_input_tokens=64), observer=Recorder())
    batcher.start()
    inputs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[4]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        many = asyncio.ensure_future(batcher.submit(Task.EMBED_ALL, token_ids=inputs))
        pooled = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[20, 21]]))
        broken = asyncio.ensure_future(batcher.submit(Task.EMBED_ALL, token_ids=[[30], [31, 777]]))
        await asyncio.sleep(0.05)
        backend.gate.set()
        r0, r1, r2, r3 = await asyncio.gather(first, many, pooled, broken, return_exceptions=True)
        assert torch.equal(r0.outputs, expected([[4]])) and torch.equal(r2.outputs, expected([[20, 21]]))
        assert isinstance(r1.outputs, list) and len(r1.outputs) == len(inputs)
        for got, want in zip(r1.outputs, expected_all(inputs)):
            assert torch.equal(got, want)
        assert r1.token_counts == [3, 1, 5, 2]
        assert isinstance(r3, InferenceFailed) and "input 1" in str(r3)
        token_batches = [b for b in backend.seen[1:] if any(x in b for x in inputs)]
        assert len(token_batches) >= 2  # max_batch_requests=3 split the four inputs
        assert all([20, 21] not in b for b in token_batches)

    try:
        run(main())
    finally:
        batcher.stop()
    assert batcher.queue_depth == 0


def test_failing_batch_fails_only_its_requests_and_worker_survives() -> None:
    batcher, backend, rec = make(BatcherLimits(max_batch_requests=1, max_input_tokens=64))
    backend.fail_token = 666

    async def main() -> None:
        backend.gate.clear()
        good = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        bad = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[666]]))
        good2 = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[7]]))
        await asyncio.sleep(0.02)
        backend.gate.set()
        r1, r2, r3 = await asyncio.gather(good, bad, good2, return_exceptions=True)
        assert torch.equal(r1.outputs, expected([[5]]))
        assert isinstance(r2, InferenceFailed) and "boom" in str(r2)
        assert torch.equal(r3.outputs, expected([[7]]))
        assert torch.equal((await batcher.submit(Task.EMBED, token_ids=[[8]])).outputs, expected([[8]]))

    try:
        run(main())
    finally:
        batcher.stop()
    assert any(b.error == "RuntimeError" for b in rec.batches)


def test_input_validation() -> None:
    batcher, _, _ = make(BatcherLimits(max_input_tokens=4))

    async def main() -> None:
        with pytest.raises(EmptyInput):
            await batcher.submit(Task.EMBED, texts=[])
        with pytest.raises(EmptyInput):
            await batcher.submit(Task.EMBED, texts=["ok", ""])
        with pytest.raises(EmptyInput):
            await batcher.submit(Task.EMBED, token_ids=[[]])
        with pytest.raises(InvalidInput, match="vocabulary"):
            await batcher.submit(Task.EMBED, token_ids=[[1, 1000]])
        with pytest.raises(InvalidInput, match="vocabulary"):
            await batcher.submit(Task.EMBED, token_ids=[[-1]])
        with pytest.raises(InputTooLong):
            await batcher.submit(Task.EMBED, token_ids=[[1, 2, 3, 4, 5]])
        with pytest.raises(InputTooLong):
            await batcher.submit(Task.EMBED, texts=["abcdef"])
        right = await batcher.submit(Task.EMBED, token_ids=[[1, 2, 3, 4, 5]], truncate=True)
        left = await batcher.submit(Task.EMBED, token_ids=[[1, 2, 3, 4, 5]], truncate=True, direction="left")
        assert torch.equal(right.outputs, expected([[1, 2, 3, 4]]))
        assert torch.equal(left.outputs, expected([[2, 3, 4, 5]]))

    try:
        run(main())
    finally:
        batcher.stop()


def test_drain_finishes_admitted_work_and_refuses_new() -> None:
    batcher, backend, _ = make()

    async def main() -> None:
        backend.gate.clear()
        admitted = [asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5 + i]])) for i in range(5)]
        assert await asyncio.to_thread(backend.entered.wait, 10)
        drain = asyncio.ensure_future(batcher.drain(5))
        await asyncio.sleep(0.02)
        with pytest.raises(ShuttingDown):
            await batcher.submit(Task.EMBED, token_ids=[[9]])
        assert not drain.done()
        backend.gate.set()
        assert await drain
        for i, fut in enumerate(admitted):
            assert torch.equal(fut.result().outputs, expected([[5 + i]]))

    try:
        run(main())
    finally:
        batcher.stop()


def test_stop_fails_queued_requests() -> None:
    batcher, backend, _ = make()

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        queued = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[6]]))
        await asyncio.sleep(0.02)
        threading.Timer(0.05, backend.gate.set).start()
        await asyncio.to_thread(batcher.stop)
        with pytest.raises(ShuttingDown):
            await queued
        await first

    run(main())


def test_batches_take_inputs_oldest_first_within_the_token_budget() -> None:
    """Packed batches cost their real tokens whatever the mix of lengths: inputs go in arrival order, and a later
    short input may fill the room a long one left (first fit); the skipped long input leads the next batch."""
    batcher, backend, rec = make(
        BatcherLimits(max_batch_tokens=40, max_batch_requests=8, max_input_tokens=64, max_wait_s=0.0)
    )

    async def main() -> None:
        backend.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]]))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        lengths = [10, 2, 30, 10, 2, 10, 2, 10]
        futs = []
        for n in lengths:  # one at a time, so that arrival order is submission order
            futs.append(asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5] * n])))
            await asyncio.sleep(0.005)
        backend.gate.set()
        await asyncio.gather(first, *futs)

    try:
        run(main())
    finally:
        batcher.stop()
    assert [b.lengths for b in rec.batches[1:]] == [[10, 2, 10, 2, 10, 2], [30, 10]]
    assert all(b.tokens == sum(b.lengths) <= 40 for b in rec.batches)


@pytest.mark.parametrize(
    ("lengths", "size", "tokens", "expected"),
    [
        ([], 8, 100, []),
        ([500], 8, 100, [0]),  # the oldest runs even alone over the budget
        ([500, 1], 8, 100, [0]),  # ... and alone: nothing fits beside it
        ([10, 95, 20, 70, 5], 8, 100, [0, 2, 3]),  # first fit in arrival order, not best fit
        ([1] * 10, 4, 100, [0, 1, 2, 3]),
        ([50, 50, 1], 8, 100, [0, 1]),
    ],
)
def test_first_fit(lengths: list[int], size: int, tokens: int, expected: list[int]) -> None:
    assert first_fit(lengths, size, tokens) == expected


def test_concurrent_request_cap() -> None:
    batcher, backend, _ = make(BatcherLimits(max_concurrent_requests=2, max_input_tokens=64))

    async def main() -> None:
        backend.gate.clear()
        held = [asyncio.ensure_future(batcher.submit(Task.EMBED, token_ids=[[5]])) for _ in range(2)]
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match="concurrent"):
            await batcher.submit(Task.EMBED, token_ids=[[6]])
        backend.gate.set()
        await asyncio.gather(*held)
        await batcher.submit(Task.EMBED, token_ids=[[6]])

    try:
        run(main())
    finally:
        batcher.stop()
