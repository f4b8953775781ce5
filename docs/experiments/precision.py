"""Speed of each compute precision against float32 on the engine (no HTTP), side by side in one run.

For each batch size, the precisions take turns on the same batches of real text (loadtest's text mix), the order
rotated each round; the table gives the median ms per batch and each precision's speed over float32's.

    python docs/experiments/precision.py models/ultrafastbert-minilm-l6 --batch-size 1 8 32 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.backend import ModelBackend, Task
from engine.checkpoint import load_model
from engine.precision import COMPUTE_DTYPES, cpu_features
from loadtest.corpus import TextMix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=list(COMPUTE_DTYPES), choices=list(COMPUTE_DTYPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=20, help="batches per dtype per round")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = load_model(a.model)
    backends = {d: ModelBackend(loaded, compute_dtype=COMPUTE_DTYPES[d]) for d in a.dtypes}
    mix = TextMix(seed=0)
    print(f"{a.model}; {cpu_features()}; torch threads {torch.get_num_threads()}")
    print("batch  " + "  ".join(f"{d:>16}" for d in a.dtypes))
    for bs in a.batch_size:
        batches = [
            loaded.tokenizer.encode(mix.texts(bs), max_length=256, truncate=True, direction="right")
            for _ in range(a.batches)
        ]
        times: dict[str, list[float]] = {d: [] for d in a.dtypes}
        for b in backends.values():
            b.forward(Task.EMBED, batches[0], False)  # warm-up
        for r in range(a.rounds):
            order = a.dtypes[r % len(a.dtypes) :] + a.dtypes[: r % len(a.dtypes)]
            for d in order:
                t0 = time.perf_counter()
                for ids in batches:
                    backends[d].forward(Task.EMBED, ids, False)
                times[d].append((time.perf_counter() - t0) / len(batches) * 1e3)
        base = statistics.median(times["float32"]) if "float32" in times else None
        cells = []
        for d in a.dtypes:
            ms = statistics.median(times[d])
            cells.append(f"{ms:7.2f} ms {base / ms:5.2f}x" if base else f"{ms:7.2f} ms")
        print(f"{bs:5d}  " + "  ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
