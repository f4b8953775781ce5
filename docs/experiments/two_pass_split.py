"""One-pass vs two-pass descent of the UltraFastBERT-1x11 FF layer, per weight dtype (docs/kernel.md: the 16 MB rule).

The two-pass descent sorts tokens by the subtree they reached so that its rows come from L2 once per bucket. It
pays only when the tree's rows do not stay in the L3 share a core can count on: this compares the automatic
choice ("auto"), the one-pass descent ("one") and the two-pass descent at the level the L2 rule alone picks
("sorted": what every dtype took before the 16 MB rule), side by side in one process, 2 threads, depth 11, width
768, 8 random batches per size, 15 alternating rounds; prints medians (µs per token) and the per-round ratio
one/sorted (> 1: sorting pays); results in docs/benchmarks.md. "auto" is the one pass for 16-bit weights.

    .venv/bin/python docs/experiments/two_pass_split.py 512 1024 2048 4096 8192
"""

import statistics
import subprocess
import sys
import time

import torch

from engine import _cmm
from engine import cmm as C
from engine.fff import FFF

torch.set_num_threads(2)
torch.manual_seed(0)
WIDTH, DEPTH = 768, 11
sizes = [int(a) for a in sys.argv[1:]] or [1024, 8192]


def l2_level(n: int, bytes_per_weight: int) -> int:
    """The split the L2 rule picks (engine: cmm_split_level without the 16 MB floor); 0 if buckets would be small."""
    out = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    budget = (int(out) if out.isdigit() and int(out) > 0 else 512 * 1024) // 2  # the kernel reads sysconf
    row_pair = 2 * WIDTH * bytes_per_weight
    split = 1
    while split < DEPTH and ((2 << (DEPTH - split)) - 1) * row_pair > budget:
        split += 1
    return split if (n >> split) >= 8 else 0


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    w = FFF(WIDTH, WIDTH, DEPTH, trees=1, weight_dtype=dtype).eval().packed_weights()
    for n in sizes:
        xs = [torch.randn(n, WIDTH) for _ in range(8)]
        calls = max(8, 16384 // n)
        sorted_at = l2_level(n, 4 if dtype == torch.float32 else 2)
        res: dict[str, list[float]] = {"auto": [], "one": [], "sorted": []}
        with torch.inference_mode():
            for _ in range(15):
                for name, split in (("auto", -1), ("one", 0), ("sorted", sorted_at)):
                    _cmm.force_split(split)
                    start = time.perf_counter()
                    for i in range(calls):
                        C.cmm(xs[i % 8], *w, DEPTH)
                    res[name].append((time.perf_counter() - start) / calls / n * 1e6)
                    _cmm.force_split(-1)
        ratios = [one / srt for one, srt in zip(res["one"], res["sorted"])]
        print(
            f"{str(dtype)[6:]:>8} {n:>5} tokens: "
            + "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in res.items())
            + f" us/token;  one/sorted median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max "
            f"{max(ratios):.2f}); auto level {_cmm.split_level(xs[0], *w, DEPTH)}, sorted level {sorted_at}",
            flush=True,
        )
