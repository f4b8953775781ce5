"""The FFF output bias added by the kernel vs added afterwards, at the default model's FFF shape (docs/kernel.md).

BERT-layout FFFs (the default model's) keep their teacher FFN's output bias. The kernel starts each output row's
sum with it (``engine.cmm.cmm(..., b_out=bias)``); before, the layer ran the kernel and then ``y + bias``. Side by
side in one process, hidden 384, K = 2 trees of depth 7, 2 threads, medians of 9 alternating rounds:

    .venv/bin/python docs/experiments/fff_output_bias.py
"""

import statistics
import time

import torch

from engine import cmm as C
from engine.fff import FFF

torch.set_num_threads(2)
fff = FFF(384, 384, 7, trees=2, bias_out=True).eval()
with torch.no_grad():
    fff.linear_out.bias.normal_()
w = fff.packed_weights()
bias = fff.linear_out.bias.detach()
for n in (64, 512, 2048, 8192):
    xs = [torch.randn(n, 384) for _ in range(4)]

    def per_call(fn, calls: int) -> float:
        start = time.perf_counter()
        for i in range(calls):
            fn(xs[i % 4])
        return (time.perf_counter() - start) / calls

    calls = max(10, 20000 // n)
    cases = {
        "no bias": lambda x: C.cmm(x, *w, 7),
        "kernel + add": lambda x: C.cmm(x, *w, 7)[0] + bias,
        "fused": lambda x: C.cmm(x, *w, 7, False, bias),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for _ in range(9):
            for name, fn in cases.items():
                times[name].append(per_call(fn, calls))
    us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(
        f"{n:>5} tokens: "
        + "  ".join(f"{k} {v:.0f} us" for k, v in us.items())
        + f"  | kernel + add / fused {us['kernel + add'] / us['fused']:.2f}x, fused / no bias "
        f"{us['fused'] / us['no bias']:.2f}",
        flush=True,
    )
