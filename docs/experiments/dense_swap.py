"""Does the FFF alone limit the default model's fidelity? Swap the teacher's own dense FFN into some layers of the
shipped student, without any training, and compare each register's mean cosine to the teacher:

    python docs/experiments/dense_swap.py models/ultrafastbert-minilm-l6 runs/corpus --per-register 150 \
        --registers product-reviews,social,conversation

Needs the corpus (`ultrafastbert corpus build runs/corpus`); the teacher is the installed all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import copy

import torch

from engine.checkpoint import convert_hf_bert, load_model
from engine.training.distill import default_teacher
from engine.training.evaluate import register_scores, register_sentences

SWAPS = ("4", "3,4", "3,4,5", "2,3,4,5")  # layers whose FFF is replaced by the teacher's dense FFN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("--per-register", type=int, default=150)
    ap.add_argument("--registers", default="product-reviews,social,conversation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher_dir = default_teacher()
    dense = convert_hf_bert(teacher_dir, ffn="dense")
    student = load_model(args.model)
    sets = register_sentences(args.corpus, args.per_register, 0)
    sets = {r: sets[r] for r in args.registers.split(",")}
    models = {"teacher": load_model(teacher_dir), "student": student}
    for swap in SWAPS:
        m = copy.deepcopy(student)
        for i in map(int, swap.split(",")):
            m.model.layers[i].ffn = copy.deepcopy(dense.model.layers[i].ffn)
        models[f"dense FFN in layers {swap}"] = m
    for register, row in register_scores(models, sets).items():
        print(register, {k: round(v["cos_mean"], 3) for k, v in row.items() if k != "sentences"})


if __name__ == "__main__":
    main()
