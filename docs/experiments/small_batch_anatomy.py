"""Where a 16-token call of the UltraFastBERT-1x11 FF op goes (docs/kernel.md).

Side by side in one process, float16 weights, width 768, 2 threads, medians of 11 alternating rounds of 3,000 calls:
the call on random tokens (the benchmark's case), on 16 copies of one token (every row hot in cache: compute
only), the same tokens through a depth-0 tree (one row each: the call's fixed cost plus the thread pool), and a call
with no tokens at all (argument checks, output allocation, the binding); then the random and the depth-0 calls on
one thread (the depth-0 pair's difference is what the thread pool costs).

    .venv/bin/python docs/experiments/small_batch_anatomy.py
"""

import statistics
import time

import torch

from engine import cmm as C
from engine.fff import FFF

torch.manual_seed(0)
torch.set_num_threads(2)
WIDTH, DEPTH, N = 768, 11, 16
w = FFF(WIDTH, WIDTH, DEPTH, trees=1, weight_dtype=torch.float16).eval().packed_weights()
w0 = FFF(WIDTH, WIDTH, 0, trees=1, weight_dtype=torch.float16).eval().packed_weights()
xs = [torch.randn(N, WIDTH) for _ in range(8)]
hot = torch.randn(1, WIDTH).expand(N, WIDTH).contiguous()
none = torch.randn(0, WIDTH)

cases = {  # name: (call, torch threads); the thread count is set before each case's timed loop, not inside it
    "random tokens": (lambda i: C.cmm(xs[i % 8], *w, DEPTH), 2),
    "one token x16 (rows hot)": (lambda i: C.cmm(hot, *w, DEPTH), 2),
    "depth 0 (one row each)": (lambda i: C.cmm(xs[i % 8], *w0, 0), 2),
    "no tokens": (lambda i: C.cmm(none, *w, DEPTH), 2),
    "random tokens, one thread": (lambda i: C.cmm(xs[i % 8], *w, DEPTH), 1),
    "depth 0, one thread": (lambda i: C.cmm(xs[i % 8], *w0, 0), 1),
}
res: dict[str, list[float]] = {k: [] for k in cases}
with torch.inference_mode():
    for _ in range(11):
        for name, (fn, threads) in cases.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for i in range(3000):
                fn(i)
            res[name].append((time.perf_counter() - start) / 3000 * 1e6)
torch.set_num_threads(2)
for name, v in res.items():
    print(f"{name:>28}: {statistics.median(v):6.2f} us per call")
