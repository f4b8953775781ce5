"""How much of a hybrid's dense layer does its fidelity need? Keep only the most important neurons of each dense FFN
(mean |GELU activation| on training text times the norm of the neuron's output column), drop the rest (their mean
output moves into the output bias), without any training, and compare each register's mean cosine to the teacher:

    python docs/experiments/dense_prune.py models/ultrafastbert-minilm-l6 runs/corpus --per-register 150

A narrower dense layer costs proportionally less time; if fidelity holds at half the width before any retraining,
a hybrid with a narrower dense layer is worth training. Needs the corpus (`ultrafastbert corpus build
runs/corpus`); the teacher is the installed all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import load_model
from engine.layers import DenseFFN
from engine.training.distill import default_teacher
from engine.training.evaluate import register_scores, register_sentences
from engine.training.training_text import CorpusText, seeded


def activation_stats(loaded, layer: int, corpus: str, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron of layer ``layer``'s dense FFN, over the tokens it sees: its importance (mean |GELU(x w_in + b)|
    times the 2-norm of its w_out column) and its mean activation (what a dropped neuron's output is replaced by)."""
    ffn = loaded.model.layers[layer].ffn
    tok = loaded.tokenizer
    text = CorpusText(corpus, 96, 0, cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"))
    total = torch.zeros(ffn.dense_in.out_features)
    signed = torch.zeros(ffn.dense_in.out_features)
    count = 0

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal total, signed, count
        x = args[0].reshape(-1, args[0].shape[-1])
        act = F.gelu(F.linear(x, ffn.dense_in.weight, ffn.dense_in.bias))
        total += act.abs().sum(0)
        signed += act.sum(0)
        count += x.shape[0]

    handle = ffn.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for b in range(batches):
                ids, mask = loaded.tokenizer.pad(text.batch(16, seeded(0, 9, b)))
                loaded.model.embed(ids, mask)
    finally:
        handle.remove()
    n = max(count, 1)
    return total / n * ffn.dense_out.weight.norm(dim=0), signed / n


def narrowed(ffn: DenseFFN, keep: torch.Tensor, mean_act: torch.Tensor) -> DenseFFN:
    """The FFN on the ``keep`` neurons; the others' mean output goes into the output bias."""
    bias = ffn.dense_in.bias is not None
    dropped = torch.ones(ffn.dense_in.out_features, dtype=torch.bool)
    dropped[keep] = False
    out = DenseFFN(ffn.dense_in.in_features, len(keep), bias=True)  # biased even for a bias-free layout: the shift
    with torch.no_grad():
        shift = ffn.dense_out.weight[:, dropped] @ mean_act[dropped]
        out.dense_in.weight.copy_(ffn.dense_in.weight[keep])
        out.dense_out.weight.copy_(ffn.dense_out.weight[:, keep])
        if bias:
            out.dense_in.bias.copy_(ffn.dense_in.bias[keep])
            out.dense_out.bias.copy_(ffn.dense_out.bias + shift)
        else:
            out.dense_in.bias.zero_()
            out.dense_out.bias.copy_(shift)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a hybrid (dense_ffn_layers in its ufb_config.json)")
    ap.add_argument("corpus")
    ap.add_argument("--per-register", type=int, default=150)
    ap.add_argument("--registers", default="product-reviews,social,conversation,questions-answers")
    ap.add_argument("--widths", default="1152,768,512,384,192")
    ap.add_argument("--batches", type=int, default=20, help="training batches of 16 for the activation statistics")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher_dir = default_teacher()
    hybrid = load_model(args.model)
    layers = hybrid.config.dense_ffn_layers
    if not layers:
        raise SystemExit(f"{args.model} has no dense layer to narrow")
    stats = {i: activation_stats(hybrid, i, args.corpus, args.batches) for i in layers}
    sets = register_sentences(args.corpus, args.per_register, 0)
    sets = {r: sets[r] for r in args.registers.split(",")}
    models = {"teacher": load_model(teacher_dir), "full width": hybrid}
    for width in map(int, args.widths.split(",")):
        m = copy.deepcopy(hybrid)
        for i in layers:
            score, mean_act = stats[i]
            keep = score.topk(width).indices.sort().values
            m.model.layers[i].ffn = narrowed(m.model.layers[i].ffn, keep, mean_act)
        m.model.pack_inference_weights()
        models[f"{width} neurons"] = m
    for register, row in register_scores(models, sets).items():
        print(register, {k: round(v["cos_mean"], 3) for k, v in row.items() if k != "sentences"})


if __name__ == "__main__":
    main()
