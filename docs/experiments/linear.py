"""The dense float32 linear kernel (engine.linear, torch.ops.ufb.linear) against torch's F.linear, side by side in
one run: first the BERT-mini projection shapes one by one, then a whole model's forward with the kernel off and on.

For each (N, K) weight, row count M and thread count, the two take turns on the same inputs, the order alternating
each round; the table gives the median microseconds per call, F.linear's time over ours (above 1: ours is faster),
each one's GFLOP/s and the largest absolute difference of the outputs. The model part times the serving forward
(ModelBackend.forward, embeddings) of one short sentence and of a batch of 32 real texts, kernel off (F.linear
everywhere) and on. Run it on a quiet machine:

    python docs/experiments/linear.py models/ultrafastbert-minilm-l6 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine import linear as dense

SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]  # (N, K): fused q/k/v, out, FFN in, FFN out
ROWS = [1, 7, 16, 32, 64, 128, 512]


def calls_per_sample(call: Callable[[], object], target_s: float = 0.02) -> int:
    """Calls per timed sample so that one sample takes about target_s."""
    call()
    n, elapsed = 1, 0.0
    while elapsed < target_s / 4:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        elapsed = time.perf_counter() - t0
        n *= 2
    return max(1, int(n / 2 * target_s / max(elapsed, 1e-9)))


def side_by_side(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each, the calls taking turns (order alternating every round)."""
    reps = {name: calls_per_sample(call) for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            call, n = calls[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shapes(threads: list[int], rounds: int) -> None:
    print("threads      N     K     M   F.linear us    ours us  speed-up  F.linear GF/s  ours GF/s  max |diff|")
    gen = torch.Generator().manual_seed(0)
    for t in threads:
        torch.set_num_threads(t)
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=gen) / k**0.5
            b = torch.randn(n, generator=gen)
            for m in ROWS:
                x = torch.randn(m, k, generator=gen)
                with torch.inference_mode():
                    diff = (dense.linear(x, w, b) - F.linear(x, w, b)).abs().max().item()
                    best = side_by_side(
                        {"torch": lambda: F.linear(x, w, b), "ours": lambda: dense.linear(x, w, b)}, rounds
                    )
                flop = 2.0 * m * n * k
                print(
                    f"{t:7d} {n:6d} {k:5d} {m:5d} {best['torch'] * 1e6:13.1f} {best['ours'] * 1e6:10.1f} "
                    f"{best['torch'] / best['ours']:8.2f}x {flop / best['torch'] / 1e9:14.1f} "
                    f"{flop / best['ours'] / 1e9:10.1f} {diff:11.2e}"
                )


def bench_model(path: str, threads: list[int], rounds: int) -> None:
    from engine.backend import ModelBackend, Task
    from engine.checkpoint import load_model
    from loadtest.corpus import TextMix

    loaded = load_model(path)
    backend = ModelBackend(loaded)
    one = loaded.tokenizer.encode(["The movie was great."], max_length=256, truncate=True, direction="right")
    batch = loaded.tokenizer.encode(TextMix(seed=0).texts(32), max_length=256, truncate=True, direction="right")
    print(f"\n{path}: forward (embeddings), kernel off (F.linear) and on")
    print("threads  input                          off ms    on ms  speed-up  max |diff|")
    for t in threads:
        torch.set_num_threads(t)
        for label, ids in (
            (f"1 sentence, {len(one[0])} tokens", one),
            (f"32 texts, {sum(map(len, batch))} tokens", batch),
        ):

            def run(on: bool, ids: list[list[int]] = ids) -> torch.Tensor:
                dense.use_kernel(on)
                return backend.forward(Task.EMBED, ids, False)[0]

            diff = (run(True) - run(False)).abs().max().item()
            best = side_by_side({"off": lambda: run(False), "on": lambda: run(True)}, rounds)
            print(
                f"{t:7d}  {label:28s} {best['off'] * 1e3:8.2f} {best['on'] * 1e3:8.2f} "
                f"{best['off'] / best['on']:8.2f}x {diff:11.2e}"
            )
    dense.use_kernel(True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="models/ultrafastbert-minilm-l6", help="model folder ('' to skip)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    if not dense.available():
        raise SystemExit("the linear kernel is not built (pip install --no-build-isolation -e .)")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    bench_shapes(a.threads, a.rounds)
    if a.model:
        bench_model(a.model, a.threads, a.rounds)


if __name__ == "__main__":
    main()
