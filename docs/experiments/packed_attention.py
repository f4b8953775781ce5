"""The packed-attention kernel against torch's SDPA per length group, side by side in one run: the attention core
alone on the batches' real lengths, and the whole forward pass (``embed_ids``) with the kernel on and off.

Batches: one short sentence, and 16 / 64 Rotten Tomatoes snippets (the load generator's text) drawn at random:

    python docs/experiments/packed_attention.py models/ultrafastbert-minilm-l6 --threads 1 2
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import attention
from engine.checkpoint import load_model
from engine.packing import pack
from engine.training.text_data import rotten_tomatoes


def best_ms(f: Callable[[], Any], rounds: int, n: int) -> float:
    """The best of ``rounds`` means over ``n`` calls (after a warm-up), in ms."""
    for _ in range(max(1, n // 5)):
        f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    if not attention.available():
        raise SystemExit("the attention kernel is not built (make dev)")
    loaded = load_model(a.model)
    model = loaded.model.eval()
    model.pack_inference_weights()
    heads, hidden = model.config.num_heads, model.config.hidden_size
    rng = random.Random(0)
    texts = rotten_tomatoes("test").texts
    batches = {
        "1 sentence": ["The movie was great."],
        "16 snippets": rng.sample(texts, 16),
        "64 snippets": rng.sample(texts, 64),
    }
    print(
        "batch | threads | tokens (lengths) | attention core: SDPA / kernel ms (ratio) "
        "| embed_ids: SDPA / kernel ms (ratio)"
    )
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name, batch in batches.items():
            ids = loaded.tokenizer.encode(batch, max_length=512, truncate=True, direction="right")
            _, packing = pack(ids)
            n_tok = int(packing.lengths.sum())
            qkv = torch.randn(n_tok, 3, heads, hidden // heads)
            n = max(3, 3000 // n_tok)
            with torch.inference_mode():
                sdpa = best_ms(lambda: attention.by_length_group(qkv, packing), a.rounds, n)
                kernel = best_ms(lambda: attention.packed(qkv, packing, heads), a.rounds, n)
                attention.use_kernel(False)
                whole_sdpa = best_ms(lambda: model.embed_ids(ids), a.rounds, max(2, n // 6))
                attention.use_kernel(True)
                whole_kernel = best_ms(lambda: model.embed_ids(ids), a.rounds, max(2, n // 6))
            lengths = sorted(packing.lengths.tolist())
            span = f"{lengths[0]}-{lengths[-1]}" if len(lengths) > 1 else str(lengths[0])
            print(
                f"{name} | {threads} | {n_tok} ({span}) | {sdpa:.3f} / {kernel:.3f} ({sdpa / kernel:.2f}x) | "
                f"{whole_sdpa:.2f} / {whole_kernel:.2f} ({whole_sdpa / whole_kernel:.2f}x)"
            )


if __name__ == "__main__":
    main()
