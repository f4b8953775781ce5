"""The engine driven directly, without HTTP or the batcher: the yardstick for the service's overhead.

Each step takes ``pool`` texts (default ``batch_size``) from the same :class:`~loadtest.corpus.TextMix` the HTTP
load uses and tokenizes them (the service tokenizes too). With ``max_batch_tokens`` unset they form batches of
``batch_size`` in order; otherwise batches of at most ``batch_size`` inputs and ``max_batch_tokens`` tokens are
taken oldest first, exactly as the service's batcher takes them from a queue of ``pool`` inputs
(:func:`engine.batcher.first_fit`). Each batch is one forward pass through
:class:`engine.backend.ModelBackend`, the exact call the batcher's worker makes, leaf recording included.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.corpus import TextMix


@dataclass
class EngineReport:
    model: str
    batch_size: int
    duration_s: float
    batches: int
    inputs_per_s: float
    tokens_per_s: float
    mean_tokens: float
    ms_per_batch: dict[str, float]  # forward only: mean, p50, p99 (p50/p99 over pools, per batch)
    tokenize_ms_per_batch: float
    forward_only_inputs_per_s: float
    torch_threads: int
    mean_batch_size: float = math.nan
    pool: int | None = None
    max_batch_tokens: int | None = None
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        m = self.ms_per_batch
        how = (
            f"batches of <= {self.batch_size} inputs and <= {self.max_batch_tokens} tokens from pools of {self.pool}"
            if self.max_batch_tokens
            else f"batch {self.batch_size}"
        )
        who = f"{self.workers} workers x {self.torch_threads}" if self.workers > 1 else f"{self.torch_threads}"
        return (
            f"engine direct, {how} on {self.model} ({who} torch threads), "
            f"{self.duration_s:.1f}s, {self.batches} batches (mean size {self.mean_batch_size:.1f})\n"
            f"  {self.inputs_per_s:.2f} inputs/s incl. tokenization ({self.forward_only_inputs_per_s:.2f} "
            f"forward only), {self.tokens_per_s:.0f} tokens/s\n"
            f"  per batch: forward ms mean {m['mean']:.1f} p50 {m['p50']:.1f} p99 {m['p99']:.1f}, tokenize "
            f"{self.tokenize_ms_per_batch:.1f} ms, tokens {self.mean_tokens:.0f}"
        )


def split_batches(ids: list[list[int]], batch_size: int, max_batch_tokens: int | None) -> list[list[list[int]]]:
    """One pool of tokenized inputs -> batches (see the module docstring)."""
    if max_batch_tokens is None:
        return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    from engine.batcher import first_fit

    out: list[list[list[int]]] = []
    queue = list(ids)
    while queue:
        taken = first_fit([len(x) for x in queue], batch_size, max_batch_tokens)
        out.append([queue[i] for i in taken])
        keep = set(taken)
        queue = [x for i, x in enumerate(queue) if i not in keep]
    return out


def calibrate_pool(
    loaded: Any,
    *,
    target_mean_size: float,
    batch_size: int,
    max_batch_tokens: int | None,
    max_pool: int,
    seed: int = 0,
    source: str = "auto",
    samples: int = 400,
) -> tuple[int, float]:
    """The pool size whose batches (same policy, same texts, no model run) have the mean size closest to
    ``target_mean_size`` -- e.g. the service's, read from /metrics. Returns (pool, its mean batch size)."""
    from engine.backend import ModelBackend

    backend = ModelBackend(loaded)
    ids = backend.tokenize(
        TextMix(seed=seed, source=source).texts(samples),
        max_length=backend.max_input_tokens,
        truncate=True,
        direction="right",
    )
    best = (1, 1.0)
    for pool in range(1, max(1, max_pool) + 1):
        sizes = [
            len(b)
            for i in range(0, len(ids) - pool + 1, pool)
            for b in split_batches(ids[i : i + pool], batch_size, max_batch_tokens)
        ]
        mean = sum(sizes) / len(sizes)
        if abs(mean - target_mean_size) < abs(best[1] - target_mean_size):
            best = (pool, mean)
    return best


def run_engine(*args: Any, workers: int = 1, threads_per_worker: int | None = None, **kwargs: Any) -> EngineReport:
    """Runs :func:`_run_engine` on ``workers`` fresh threads at once (each with its own texts, as the service's
    ``inference_workers`` run their own batches), and merges their reports. Fresh threads, even for one worker, as
    the service's batcher runs its forward passes: on this machine the same forward pass took about twice as long
    on the main thread as on a worker thread (torch's OpenMP pool under CPU contention), so the main thread would
    not be a fair yardstick. ``threads_per_worker``: torch threads each worker sets (default: torch's share)."""
    import torch

    from engine.batcher import worker_threads

    n = max(1, workers)
    threads = worker_threads(n, threads_per_worker)
    boxes: list[dict[str, Any]] = [{} for _ in range(n)]

    def target(i: int) -> None:
        try:
            if threads:
                torch.set_num_threads(threads)
            kw = dict(kwargs, seed=kwargs.get("seed", 0) + i)
            boxes[i]["report"] = _run_engine(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            boxes[i]["error"] = exc

    ts = [threading.Thread(target=target, args=(i,), name=f"ufb-engine-bench-{i}") for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for box in boxes:
        if "error" in box:
            raise box["error"]
    reports: list[EngineReport] = [box["report"] for box in boxes]
    return reports[0] if n == 1 else _merge(reports)


def _merge(reports: list[EngineReport]) -> EngineReport:
    """Workers that ran side by side for the same duration: rates add up, per-batch figures are batch-weighted
    means (p50/p99: the worst worker's)."""
    batches = sum(r.batches for r in reports)

    def weighted(get: Any) -> float:
        return sum(get(r) * r.batches for r in reports) / batches if batches else math.nan

    first = reports[0]
    return EngineReport(
        model=first.model,
        batch_size=first.batch_size,
        duration_s=max(r.duration_s for r in reports),
        batches=batches,
        inputs_per_s=sum(r.inputs_per_s for r in reports),
        tokens_per_s=sum(r.tokens_per_s for r in reports),
        mean_tokens=weighted(lambda r: r.mean_tokens),
        ms_per_batch={
            "mean": weighted(lambda r: r.ms_per_batch["mean"]),
            "p50": max(r.ms_per_batch["p50"] for r in reports),
            "p99": max(r.ms_per_batch["p99"] for r in reports),
        },
        tokenize_ms_per_batch=weighted(lambda r: r.tokenize_ms_per_batch),
        forward_only_inputs_per_s=sum(r.forward_only_inputs_per_s for r in reports),
        torch_threads=first.torch_threads,
        mean_batch_size=weighted(lambda r: r.mean_batch_size),
        pool=first.pool,
        max_batch_tokens=first.max_batch_tokens,
        workers=len(reports),
    )


def _run_engine(
    model: str | Path | Any,
    *,
    batch_size: int,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    seed: int = 0,
    source: str = "auto",
    record_leaves: bool = True,
    max_batches: int | None = None,
    pool: int | None = None,
    max_batch_tokens: int | None = None,
    compute_dtype: str = "float32",
) -> EngineReport:
    """``model``: a folder, or an already loaded ``engine.checkpoint.LoadedModel``; ``compute_dtype`` as the
    service's setting of that name."""
    import torch

    from engine.backend import ModelBackend, Task
    from engine.checkpoint import load_model
    from engine.precision import COMPUTE_DTYPES
    from loadtest.runner import percentile

    loaded = load_model(model) if isinstance(model, (str, Path)) else model
    backend = ModelBackend(loaded, compute_dtype=COMPUTE_DTYPES[compute_dtype])
    mix = TextMix(seed=seed, source=source)
    max_len = backend.max_input_tokens

    n_pool = pool or batch_size

    def step() -> tuple[float, float, list[tuple[int, int]]]:
        texts = mix.texts(n_pool)
        t0 = time.perf_counter()
        ids = backend.tokenize(texts, max_length=max_len, truncate=True, direction="right")
        t1 = time.perf_counter()
        shapes = []
        for b in split_batches(ids, batch_size, max_batch_tokens):
            out, _ = backend.forward(Task.EMBED, b, record_leaves)
            assert isinstance(out, torch.Tensor) and out.shape[0] == len(b)
            shapes.append((len(b), sum(map(len, b))))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, shapes

    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        step()
    tok_s: list[float] = []
    fwd_s: list[float] = []
    shapes: list[tuple[int, int]] = []
    t_start = time.perf_counter()
    end = t_start + duration_s
    while time.perf_counter() < end and (max_batches is None or len(shapes) < max_batches):
        a, b, sh = step()
        tok_s.append(a)
        fwd_s.append(b)
        shapes.extend(sh)
    elapsed = time.perf_counter() - t_start
    n = len(shapes)
    inputs = sum(s[0] for s in shapes)
    per_batch_ms = [x * 1e3 * len(fwd_s) / n for x in fwd_s] if n else []
    return EngineReport(
        model=str(getattr(loaded, "path", model)),
        batch_size=batch_size,
        duration_s=elapsed,
        batches=n,
        inputs_per_s=inputs / elapsed,
        tokens_per_s=sum(s[1] for s in shapes) / elapsed,
        mean_tokens=sum(s[1] for s in shapes) / n if n else math.nan,
        ms_per_batch={
            "mean": sum(fwd_s) * 1e3 / n if n else math.nan,
            "p50": percentile(per_batch_ms, 50),
            "p99": percentile(per_batch_ms, 99),
        },
        tokenize_ms_per_batch=sum(tok_s) * 1e3 / n if n else math.nan,
        forward_only_inputs_per_s=inputs / sum(fwd_s) if n else math.nan,
        torch_threads=torch.get_num_threads(),
        mean_batch_size=inputs / n if n else math.nan,
        pool=n_pool,
        max_batch_tokens=max_batch_tokens,
    )
