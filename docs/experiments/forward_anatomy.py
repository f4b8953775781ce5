"""Where a short request's forward pass goes: time per part of the model, and the dense linear with its weights in
cache (the same matrix each call) or not (16 matrices in turn, more than the last-level cache holds).

The first half times each part of ``embed_ids`` on one 7-token sentence by wrapping the modules' forwards
(a wrapper costs about a microsecond, so small parts read high); the second half runs the compiled linear alone:

    python docs/experiments/forward_anatomy.py models/ultrafastbert-minilm-l6 --threads 1 2
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch

import engine.model as model_module
from engine import linear
from engine.checkpoint import load_model
from engine.model import UltraFastBert


def per_call_us(f: Callable[[], Any], n: int) -> float:
    for _ in range(n // 10):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


def timed(totals: collections.Counter[str], obj: Any, name: str, method: str = "forward") -> None:
    inner = getattr(obj, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    setattr(obj, method, wrapper)


def model_parts(folder: str, text: str, n: int) -> None:
    loaded = load_model(folder)
    model: UltraFastBert = loaded.model.eval()
    model.pack_inference_weights()
    ids = loaded.tokenizer.encode([text], max_length=512, truncate=True, direction="right")
    with torch.inference_mode():
        whole = per_call_us(lambda: model.embed_ids(ids, normalize=False), n)
    totals: collections.Counter[str] = collections.Counter()
    for layer in model.layers:
        timed(totals, layer.attention, "attention (q/k/v, attention core, output projection)", "forward_packed")
        timed(totals, layer.attn_norm, "LayerNorms")
        timed(totals, layer.ffn_norm, "LayerNorms")
        timed(totals, layer.ffn, f"feedforward: {type(layer.ffn).__name__}")
    timed(totals, model.embeddings, "embeddings", "forward_packed")
    timed(totals, model_module, "packing the batch", "pack")
    with torch.inference_mode():
        per_call_us(lambda: model.embed_ids(ids, normalize=False), n)
    print(f"  embed_ids, {len(ids[0])} tokens: {whole / 1e3:.2f} ms (unwrapped)")
    for name, seconds in totals.most_common():
        print(f"    {name:48s} {seconds / (n + n // 10) * 1e3:.3f} ms")


def linear_cache(n: int) -> None:
    with torch.inference_mode():
        for k, out in ((384, 1152), (1536, 384)):
            weights = [torch.randn(out, k) * 0.05 for _ in range(16)]
            bias = torch.randn(out)
            for rows in (1, 7, 32):
                x = torch.randn(rows, k)
                hot = per_call_us(lambda: linear.linear(x, weights[0], bias), n)
                turn = iter(range(1 << 40))
                cold = per_call_us(lambda: linear.linear(x, weights[next(turn) % 16], bias), n)
                print(f"  linear {rows:2d} x {k} -> {out}: in cache {hot:6.1f} us, not {cold:6.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--text", default="The movie was great.")
    p.add_argument("-n", type=int, default=1000)
    a = p.parse_args()
    if not linear.available():
        raise SystemExit("the compiled linear is not built (make dev)")
    for threads in a.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s):")
        model_parts(a.model, a.text, a.n)
        linear_cache(a.n)


if __name__ == "__main__":
    main()
