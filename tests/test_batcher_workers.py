"""The batcher with several inference workers: batches run side by side, and a request split across workers gets
every row exactly once."""

from __future__ import annotations

import asyncio
import threading

import torch
from batcher_support import FakeBackend, Recorder, expected, run

from engine.backend import Task
from engine.batcher import Batcher, BatcherLimits


def test_several_inference_workers_run_batches_side_by_side() -> None:
    """Two workers: two forward passes are in flight at once (a barrier only both can pass), each sets its torch
    threads by how many run, every request still gets exactly its own result, and stop() joins them all."""

    class BarrierBackend(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.barrier = threading.Barrier(2, timeout=5)  # broken (and the batch failed) if never 2 in flight
            self.lock = threading.Lock()
            self.calls = 0
            self.threads: set[str] = set()
            self.torch_threads: list[int] = []

        def forward(self, task, ids, record_leaves):
            with self.lock:
                self.calls += 1
                first_two = self.calls <= 2
                self.threads.add(threading.current_thread().name)
                self.torch_threads.append(torch.get_num_threads())
            if first_two:
                self.barrier.wait()
            return super().forward(task, ids, record_leaves)

    backend, rec = BarrierBackend(), Recorder()
    threads_before = torch.get_num_threads()
    batcher = Batcher(
        backend,
        BatcherLimits(max_input_tokens=64, max_batch_requests=2, inference_workers=2, threads_per_worker=1),
        observer=rec,
    )
    batcher.start()

    async def main():
        texts = [f"request number {i}" for i in range(24)]
        results = await asyncio.gather(*(batcher.submit(Task.EMBED, texts=[t]) for t in texts))
        for t, r in zip(texts, results):
            torch.testing.assert_close(
                r.outputs, expected(backend.tokenize([t], max_length=64, truncate=False, direction="right"))
            )

    try:
        run(main())
        assert backend.threads == {"ufb-inference-0", "ufb-inference-1"}
        # the first batch started alone (both workers' threads), the second beside it (its share)
        assert backend.torch_threads[:2] == [2, 1] and set(backend.torch_threads) <= {1, 2}
    finally:
        batcher.stop()
        torch.set_num_threads(threads_before)
    assert not any(t.name.startswith("ufb-inference") and t.is_alive() for t in threading.enumerate())


def test_requests_split_across_workers_get_every_row_once() -> None:
    """Multi-input requests whose inputs land in batches of different workers still resolve once, with every row
    in its place (the per-request bookkeeping is shared between workers)."""
    batcher = Batcher(
        FakeBackend(),
        BatcherLimits(max_input_tokens=64, max_batch_requests=3, inference_workers=2, threads_per_worker=1),
    )
    batcher.start()
    threads_before = torch.get_num_threads()

    async def main():
        reqs = [[f"r{r} input {i} " + "x" * ((r * 7 + i * 3) % 20) for i in range(1 + r % 7)] for r in range(60)]
        results = await asyncio.gather(*(batcher.submit(Task.EMBED, texts=t) for t in reqs))
        for texts, res in zip(reqs, results):
            ids = FakeBackend().tokenize(texts, max_length=64, truncate=False, direction="right")
            torch.testing.assert_close(res.outputs, expected(ids))

    try:
        run(main())
    finally:
        batcher.stop()
        torch.set_num_threads(threads_before)
