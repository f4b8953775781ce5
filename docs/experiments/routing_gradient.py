"""Does a gradient for the tree splits fit an FFN better than hard routing, at equal steps? (model card,
"Continuing the shipped student")

Hard routing gives the routing decisions no gradient; ``FFF.routing_tau > 0`` keeps the forward pass and gives the
visited-node mask soft routing's gradient (straight-through). Per layer of all-MiniLM-L6-v2: the teacher's FFN
inputs and outputs on 70,000 tokens of the standard distillation text (60,000 to train on, 10,000 held out), an
FFF of 2 trees of depth 7 seeded from the teacher's neurons (``distill``'s start), then 1,500 Adam steps of 2,048
tokens, lr 1e-3 cosine to 5 % (the layer-wise phase's recipe) with each ``routing_tau``; the held-out relative
error is measured with hard routing, as the kernel computes. About 8 minutes per layer on 2 cores:

    .venv/bin/python docs/experiments/routing_gradient.py [STEPS] [LAYERS, e.g. 1,3]
"""

import copy
import math
import sys
import time

import torch
import torch.nn.functional as F

from engine.checkpoint import convert_hf_bert, load_model
from engine.training.distill import default_teacher
from engine.training.targets import collect_ffn_pairs, relative_error
from engine.training.text_data import distillation_texts
from engine.training.training_text import TrainingText

torch.set_num_threads(2)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
LAYERS = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 3]
TRAIN = 60_000

teacher_dir = default_teacher()
teacher = load_model(teacher_dir)
text = TrainingText(teacher.tokenizer, distillation_texts("standard"), 96, seed=0)
xs, ys = collect_ffn_pairs(teacher, text.chunks, 70_000, 32, progress=False)
student = convert_hf_bert(teacher_dir, trees=2, depth=7, init="teacher")

for layer in LAYERS:
    x_all, y_all = xs[layer].float(), ys[layer].float()
    x_train, y_train, x_held, y_held = x_all[:TRAIN], y_all[:TRAIN], x_all[TRAIN:], y_all[TRAIN:]
    start = student.model.layers[layer].ffn
    print(f"layer {layer}: teacher-neuron init, held-out relative error {relative_error(start, x_held, y_held):.3f}")
    for tau in (0.0, 1.0, 0.3):
        fff = copy.deepcopy(start).train()
        fff.routing_tau = tau
        optim = torch.optim.Adam(fff.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for step in range(STEPS):
            for group in optim.param_groups:
                group["lr"] = 1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / STEPS)))
            idx = torch.randint(0, TRAIN, (2048,), generator=gen)
            loss = F.mse_loss(fff(x_train[idx]), y_train[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            fff.invalidate()
        fff.eval()
        print(
            f"  routing_tau {tau:3.1f}: held-out {relative_error(fff, x_held, y_held):.3f}  "
            f"train {relative_error(fff, x_train[:8000], y_train[:8000]):.3f}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
