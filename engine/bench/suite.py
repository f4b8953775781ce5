"""Side-by-side speed benchmark: ``python -m engine.bench [--json] [--threads N] [--quick]``.

Everything compared in one table is measured in the same process, with the same thread count, alternating
between the contenders, and reported as medians of repeated runs, because these machines are shared and
noisy: only ratios measured side by side mean anything. Inputs rotate over several random batches so the
kernel cannot keep one token's path hot in cache between calls.

Two parts:

* **FF layer**, 768 -> 768: the CMM kernel (the bare op and the ``FFF`` module the model runs, float32,
  bfloat16 and float16 weights) vs PyTorch's dense feedforward of the same width (Linear 768 -> 4095, GELU,
  Linear 4095 -> 768) and vs the masking implementation the published model runs.
* **Whole encoder**, UltraFastBERT-1x11 shape (crammed layout, 16 layers, hidden 768, 12 heads): with the
  kernel vs the same model with a dense 3072-wide FFN, vs Hugging Face ``BertModel`` of that size, and vs the
  model with the FFN removed, which gives the Amdahl bound (dense time / no-FFN time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine import cmm as C
from engine.config import ModelConfig
from engine.fff import FFF
from engine.model import UltraFastBert

FF_TOKENS: tuple[int, ...] = (1, 16, 128, 1024, 8192)
ENCODER_SHAPES: tuple[tuple[int, int], ...] = ((1, 128), (8, 128), (32, 128))
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # FFF.packed_weights(): w_in, b_in, w_out


def measure(contenders: dict[str, Callable[[int], Any]], repeats: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each contender; contenders alternate within every repeat."""
    loops: dict[str, int] = {}
    for name, fn in contenders.items():  # warm up and size each contender's inner loop
        fn(0)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 4:
            fn(n)
            n += 1
        per_call = (time.perf_counter() - start) / n
        loops[name] = max(1, int(min_seconds / per_call))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            n = loops[name]
            start = time.perf_counter()
            for i in range(n):
                fn(i)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


# ------------------------------------------------------------------------------------------ FF layer


def bench_ff_layer(tokens: tuple[int, ...], repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    width, depth = 768, 11
    fff = FFF(width, width, depth, trees=1).eval()
    modules = {"fp32": fff}  # the same weights, packed in each kernel weight dtype
    for tag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        modules[tag] = FFF(width, width, depth, trees=1, weight_dtype=dtype).eval()
        modules[tag].load_state_dict(fff.state_dict())
    packed = {tag: m.packed_weights() for tag, m in modules.items()}
    dense_in = torch.nn.Linear(width, C.n_nodes(depth))
    dense_out = torch.nn.Linear(C.n_nodes(depth), width)
    masked = FFF(width, width, depth, trees=1, impl="masked").eval()
    masked.load_state_dict(fff.state_dict())

    rows = []
    for n in tokens:
        batches = [torch.randn(n, width) for _ in range(8 if n <= 1024 else 2)]

        def pick(i: int) -> torch.Tensor:
            return batches[i % len(batches)]

        contenders: dict[str, Callable[[int], Any]] = {
            "dense": lambda i: dense_out(F.gelu(dense_in(pick(i)))),
            "masked": lambda i: masked(pick(i)),
        }
        if C.KERNEL.compiled:
            for tag, w in packed.items():

                def op(i: int, w: Packed = w) -> Any:
                    return C.cmm(pick(i), *w, depth)

                contenders[f"cmm_op_{tag}"] = op
        for tag, module in modules.items():

            def call_module(i: int, m: FFF = module) -> Any:
                return m(pick(i))

            contenders[f"fff_module_{tag}"] = call_module
        with torch.inference_mode():
            secs = measure(contenders, repeats, min_seconds if n <= 1024 else min_seconds * 2)
        row: dict[str, Any] = {"tokens": n}
        for name, s in secs.items():
            row[f"{name}_us_per_token"] = s / n * 1e6
        for name in secs:
            if name not in ("dense", "masked"):
                row[f"speedup_{name}_vs_dense"] = secs["dense"] / secs[name]
                row[f"speedup_{name}_vs_masked"] = secs["masked"] / secs[name]
        rows.append(row)
        print_ff_row(row)
    return rows


def print_ff_row(row: dict[str, Any]) -> None:
    names = [k[: -len("_us_per_token")] for k in row if k.endswith("_us_per_token")]
    times = "  ".join(f"{n}={row[n + '_us_per_token']:.3f}" for n in names)
    ratios = "  ".join(
        f"{k[len('speedup_') : -len('_vs_dense')]}={v:.0f}x"
        for k, v in row.items()
        if k.startswith("speedup_") and k.endswith("_vs_dense")
    )
    print(f"  tokens={row['tokens']:>5}  us/token: {times}\n               vs dense: {ratios}", flush=True)


# ------------------------------------------------------------------------------------------ kernel anatomy


def bench_anatomy(repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    """Where a token's time goes, on one thread: the same op on paths whose rows are hot in cache (every token
    follows one path), on random paths through weights that fit in L2 (depth 5), and on random paths through
    the full depth-11 tree (rows mostly from L3 or memory). The gaps separate compute from memory stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        n, width = 1024, 768
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases: dict[str, Callable[[int], Any]] = {}
            for depth in (0, 5, 11):
                fff = FFF(width, width, depth, trees=1, weight_dtype=dtype).eval()
                w = fff.packed_weights()
                random_x = [torch.randn(n, width) for _ in range(2)]

                def random_paths(i: int, w: Packed = w, d: int = depth, xs: list[torch.Tensor] = random_x) -> Any:
                    return C.cmm(xs[i % 2], *w, d)

                cases[f"depth{depth}_random"] = random_paths
                if depth == 11:
                    same_x = torch.randn(1, width).expand(n, width).contiguous()

                    def one_path(i: int, w: Packed = w, x: torch.Tensor = same_x) -> Any:
                        return C.cmm(x, *w, 11)

                    cases["depth11_one_path"] = one_path
            with torch.inference_mode():
                secs = measure(cases, repeats, min_seconds)
            row = {"weights": str(dtype).replace("torch.", ""), "tokens": n, "threads": 1}
            row.update({f"{k}_ns_per_token": v / n * 1e9 for k, v in secs.items()})
            rows.append(row)
            print(
                "  " + f"{row['weights']:>8}: " + "  ".join(f"{k}={v / n * 1e9:.0f}ns" for k, v in secs.items()),
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    return rows


# ------------------------------------------------------------------------------------------ kernel variants


def _pinned(path: str = "auto", split: int = -1) -> Callable[[Callable[[], Any]], Any]:
    """Runs a call with the kernel's instruction-set path and split level pinned, then unpins them."""
    from engine import _cmm

    def run(call: Callable[[], Any]) -> Any:
        _cmm.force_path(path)
        _cmm.force_split(split)
        try:
            return call()
        finally:
            _cmm.force_path("auto")
            _cmm.force_split(-1)

    return run


def bench_variants(repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    """What each kernel choice buys, side by side on the FF layer's shape: the default (widest instruction set,
    two-pass descent where chosen, direct binding) against the same call with one choice undone."""
    torch.manual_seed(0)
    width, depth = 768, 11
    rows = []
    for dtype in (torch.float32, torch.float16):
        w = FFF(width, width, depth, trees=1, weight_dtype=dtype).eval().packed_weights()
        for n in (1, 128, 1024, 8192):
            xs = [torch.randn(n, width) for _ in range(2)]
            one_pass, avx2 = _pinned(split=0), _pinned(path="avx2")
            cases: dict[str, Callable[[int], Any]] = {
                "default": lambda i: C.cmm(xs[i % 2], *w, depth),
                "one_pass": lambda i: one_pass(lambda: C.cmm(xs[i % 2], *w, depth)),
                "avx2": lambda i: avx2(lambda: C.cmm(xs[i % 2], *w, depth)),
                "dispatcher": lambda i: torch.ops.ufb.cmm.default(xs[i % 2], *w, depth, False),
            }
            with torch.inference_mode():
                secs = measure(cases, repeats, min_seconds)
            row: dict[str, Any] = {"weights": str(dtype).replace("torch.", ""), "tokens": n}
            row.update({f"{k}_us_per_token": v / n * 1e6 for k, v in secs.items()})
            row.update({f"default_vs_{k}": v / secs["default"] for k, v in secs.items() if k != "default"})
            rows.append(row)
            print(
                f"  {row['weights']:>8} tokens={n:>5}  default={row['default_us_per_token']:.3f} us/token;  "
                + "  ".join(f"vs {k}: {row['default_vs_' + k]:.2f}x" for k in cases if k != "default"),
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------------------ whole encoder


def encoder_config(ffn: str) -> ModelConfig:
    """UltraFastBERT-1x11 shape: crammedBERT layout, 16 layers, hidden 768, 12 heads, one tree of depth 11."""
    return ModelConfig(
        layout="crammed",
        vocab_size=32768,
        hidden_size=768,
        num_layers=16,
        num_heads=12,
        ffn=ffn,
        fff_trees=1,
        fff_depth=11,
        intermediate_size=3072,
        max_position_embeddings=128,
        type_vocab_size=0,
        pooling="mean",
        normalize=False,
        name=f"bench-{ffn}",
    )


def bench_encoder(shapes: tuple[tuple[int, int], ...], repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    from transformers import BertConfig, BertModel

    models: dict[str, torch.nn.Module] = {}
    for ffn in ("fff", "dense", "none"):
        model = UltraFastBert(encoder_config(ffn)).eval()
        model.init_weights(seed=0)
        models[ffn] = model
    fff_bf16 = UltraFastBert(encoder_config("fff")).eval()
    fff_bf16.load_state_dict(models["fff"].state_dict())
    fff_bf16.set_ffn_weight_dtype(torch.bfloat16)
    models["fff_bf16"] = fff_bf16
    hf = BertModel(
        BertConfig(
            vocab_size=32768,
            hidden_size=768,
            num_hidden_layers=16,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=128,
        ),
        add_pooling_layer=False,
    ).eval()

    rows = []
    for batch, seq in shapes:
        gen = torch.Generator().manual_seed(batch)
        inputs = [torch.randint(1, 32768, (batch, seq), generator=gen) for _ in range(2)]
        mask = torch.ones(batch, seq, dtype=torch.long)
        contenders: dict[str, Callable[[int], Any]] = {}
        for name, m in models.items():

            def run(i: int, m: torch.nn.Module = m) -> Any:
                return m(inputs[i % 2], mask)

            contenders[name] = run
        contenders["hf_bert"] = lambda i: hf(input_ids=inputs[i % 2], attention_mask=mask)
        with torch.inference_mode():
            secs = measure(contenders, repeats, min_seconds)
        amdahl = secs["dense"] / secs["none"]
        row: dict[str, Any] = {"batch": batch, "seq": seq}
        row.update({f"{name}_ms": s * 1e3 for name, s in secs.items()})
        row["amdahl_bound"] = amdahl
        for name in ("fff", "fff_bf16"):
            row[f"speedup_{name}_vs_dense"] = secs["dense"] / secs[name]
            row[f"speedup_{name}_vs_hf_bert"] = secs["hf_bert"] / secs[name]
            row[f"{name}_fraction_of_amdahl"] = (secs["dense"] / secs[name]) / amdahl
        rows.append(row)
        print(
            f"  {batch}x{seq}: "
            + "  ".join(f"{n}={secs[n] * 1e3:.1f}ms" for n in secs)
            + f"\n         speedup fff={row['speedup_fff_vs_dense']:.2f}x bf16={row['speedup_fff_bf16_vs_dense']:.2f}x"
            f" vs dense, amdahl bound={amdahl:.2f}x -> {row['fff_fraction_of_amdahl']:.0%} /"
            f" {row['fff_bf16_fraction_of_amdahl']:.0%} of bound;"
            f" vs HF BertModel {row['speedup_fff_vs_hf_bert']:.2f}x",
            flush=True,
        )
    return rows


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "kernel": C.KERNEL.describe()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="minimum time of one repeat")
    parser.add_argument("--only", choices=("ff", "anatomy", "variants", "encoder"), default=None)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, shapes, repeats = FF_TOKENS, ENCODER_SHAPES, args.repeats
    if args.quick:
        tokens, shapes, repeats = (1, 128), ((1, 128),), 3
    result: dict[str, Any] = {"machine": machine()}
    print(f"machine: {result['machine']}")
    if args.only in (None, "ff"):
        print("FF layer 768 -> 768 (UltraFastBERT-1x11: depth 11, one tree; dense = 4095 wide)")
        result["ff_layer"] = bench_ff_layer(tokens, repeats, args.min_seconds)
    if args.only in (None, "anatomy") and C.KERNEL.compiled and not args.quick:
        print("Kernel anatomy: ns per token, one thread, 1024 tokens (one path = rows hot in cache)")
        result["anatomy"] = bench_anatomy(repeats, args.min_seconds)
    if args.only in (None, "variants") and C.KERNEL.compiled and not args.quick:
        print(f"Kernel variants: the default ({C.KERNEL.name}) vs one choice undone (ratios > 1: the choice pays)")
        result["variants"] = bench_variants(repeats, args.min_seconds)
    if args.only in (None, "encoder"):
        print("Whole encoder, UltraFastBERT-1x11 shape (16 layers, hidden 768)")
        result["encoder"] = bench_encoder(shapes, max(3, repeats // 2), args.min_seconds)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
