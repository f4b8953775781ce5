"""What an ``FFF`` module call costs on top of the bare op at 1 and 16 tokens (docs/kernel.md).

Side by side in one process, float16 weights, UltraFastBERT-1x11 shape (width 768, depth 11), 2 threads, medians of
11 alternating rounds of 5,000 calls:

* the bare op (``engine.cmm.cmm``);
* the module as shipped: its serving case is one extension call (``fff_forward`` in ``csrc/python/fast_path.cpp``);
* the module's Python path (``engine.fff._FFF_FORWARD`` set to None for the round), which checks the packed weights
  with the extension's ``tensor_stamp``;
* the same Python path with the stamp read from Python (``engine.derived.python_stamp``: ``data_ptr()``,
  ``_version``, ``numel()`` per source tensor), as before ``tensor_stamp`` existed.

    .venv/bin/python docs/experiments/module_overhead.py
"""

import statistics
import time

import torch

from engine import cmm as C
from engine import derived
from engine import fff as fff_module
from engine.fff import FFF

torch.manual_seed(0)
torch.set_num_threads(2)
module = FFF(768, 768, 11, trees=1, weight_dtype=torch.float16).eval()
w = module.packed_weights()
compiled_stamp, single_call = derived.stamp, fff_module._FFF_FORWARD

# name: (call, stamp, FFF's single-call fast path)
CASES = {
    "bare op": (lambda x: C.cmm(x, *w, 11), compiled_stamp, single_call),
    "module (one call)": (lambda x: module(x), compiled_stamp, single_call),
    "module, Python path": (lambda x: module(x), compiled_stamp, None),
    "module, Python path + Python stamp": (lambda x: module(x), derived.python_stamp, None),
}

for n in (1, 16):
    xs = [torch.randn(n, 768) for _ in range(8)]
    res: dict[str, list[float]] = {k: [] for k in CASES}
    with torch.inference_mode():
        for _ in range(11):
            for name, (fn, stamp, fast) in CASES.items():
                derived.stamp, fff_module._FFF_FORWARD = stamp, fast  # switched outside the timed loop; the two
                fn(
                    xs[0]
                )  # stamps never compare equal, so the first call after a switch repacks: kept out of the timing
                start = time.perf_counter()
                for i in range(5000):
                    fn(xs[i % 8])
                res[name].append((time.perf_counter() - start) / 5000 * 1e6)
    derived.stamp, fff_module._FFF_FORWARD = compiled_stamp, single_call
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{n} token(s): " + "  ".join(f"{k} {v:.2f} us" for k, v in med.items()))
    print(
        "  on top of the op: "
        + "  ".join(f"{k} {v - med['bare op']:.2f} us" for k, v in med.items() if k != "bare op"),
        flush=True,
    )
