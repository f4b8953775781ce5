"""The batcher tests' fake backend (its output is a pure function of each input's ids; ``gate`` holds the worker
inside a forward pass), the outputs it should give, and a batch recorder."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch

from engine.backend import Task
from engine.batcher import Batcher, BatcherLimits, BatchStats
from engine.errors import InputTooLong


class FakeBackend:
    vocab_size = 1000
    tree_depth = None

    def __init__(self) -> None:
        self.max_input_tokens = 64
        self.seen: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_token: int | None = None

    def tokenize(self, texts: Sequence[str], *, max_length: int, truncate: bool, direction: str) -> list[list[int]]:
        out = []
        for i, t in enumerate(texts):
            ids = [1] + [3 + ord(c) % 900 for c in t] + [2]
            if len(ids) > max_length:
                if not truncate:
                    raise InputTooLong(i, len(ids), max_length)
                ids = ids[:max_length]
            out.append(ids)
        return out

    def forward(self, task: Task, ids: Sequence[Sequence[int]], record_leaves: bool):
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        self.seen.append([list(x) for x in ids])
        if self.fail_token is not None and any(self.fail_token in x for x in ids):
            raise RuntimeError("boom")
        if task is Task.EMBED_ALL:
            return expected_all(ids), None
        return expected(ids, task), None


def expected_all(ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Task.EMBED_ALL: per input, one row per token (its id and its position)."""
    return [torch.tensor([[float(t), float(p)] for p, t in enumerate(x)]) for x in ids]


def expected(ids: Sequence[Sequence[int]], task: Task = Task.EMBED) -> torch.Tensor:
    bias = 0.0 if task is Task.EMBED else 1000.0
    return torch.tensor([[float(sum(x)) + bias, float(len(x)), float(x[0]), float(x[-1])] for x in ids])


class Recorder:
    def __init__(self) -> None:
        self.batches: list[BatchStats] = []

    def on_batch(self, stats: BatchStats) -> None:
        self.batches.append(stats)


def make(limits: BatcherLimits | None = None) -> tuple[Batcher, FakeBackend, Recorder]:
    backend, rec = FakeBackend(), Recorder()
    batcher = Batcher(backend, limits or BatcherLimits(max_input_tokens=64), observer=rec)
    batcher.start()
    return batcher, backend, rec


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))
