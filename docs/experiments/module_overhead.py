"""What an ``FFF`` module call costs on top of the bare op at 1 and 16 tokens (README, kernel: the module targets).

Side by side in one process, float16 weights, UltraFastBERT-1x11 shape (width 768, depth 11), 2 threads, medians of
11 alternating rounds of 5,000 calls: the bare op (``engine.cmm.cmm``), the module as shipped (its packed-weight
check through the extension's ``tensor_stamp``), and the same module with the check done by the Python reads
it replaced (``engine.derived.python_stamp``: ``data_ptr()``, ``_version``, ``numel()`` per source tensor).

    .venv/bin/python docs/experiments/module_overhead.py
"""
import statistics
import time

import torch

from engine import cmm as C
from engine import derived
from engine.fff import FFF

torch.manual_seed(0)
torch.set_num_threads(2)
module = FFF(768, 768, 11, trees=1, weight_dtype=torch.float16).eval()
w = module.packed_weights()
compiled_stamp = derived.stamp



for n in (1, 16):
    xs = [torch.randn(n, 768) for _ in range(8)]
    cases = {
        "bare op": lambda x: C.cmm(x, *w, 11),
        "module, compiled stamp": lambda x: module(x),
        "module, Python stamp": lambda x: module(x),
    }
    stamps = {"bare op": compiled_stamp, "module, compiled stamp": compiled_stamp,
              "module, Python stamp": derived.python_stamp}
    res: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for _ in range(11):
            for name, fn in cases.items():
                derived.stamp = stamps[name]  # switched outside the timed loop; the two stamps never compare
                fn(xs[0])  # equal, so the first call after a switch repacks the weights: keep it out of the timing
                start = time.perf_counter()
                for i in range(5000):
                    fn(xs[i % 8])
                res[name].append((time.perf_counter() - start) / 5000 * 1e6)
    derived.stamp = compiled_stamp
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{n} token(s): " + "  ".join(f"{k} {v:.2f} us" for k, v in med.items())
          + f"  | module overhead: compiled {med['module, compiled stamp'] - med['bare op']:.2f} us,"
          f" Python {med['module, Python stamp'] - med['bare op']:.2f} us")
