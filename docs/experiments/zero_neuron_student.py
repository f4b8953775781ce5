"""The 0-neuron control of the model card's trade-off table ("How much the FFF layers add at all").

all-MiniLM-L6-v2 with its FFNs removed, trained with the equal-work end-to-end recipe (1,500 steps, lr 1.5e-4,
batch 16, max length 96, seed 0; the same batches in the same order as ``engine.distill``'s end-to-end phase). Run
from the repository root (about 11 minutes on 2 cores), then evaluate:

    .venv/bin/python docs/experiments/zero_neuron_student.py
    .venv/bin/ultrafastbert evaluate runs/zero-neuron-e2e/model --json runs/zero-neuron-e2e/eval.json --threads 2
"""
import time

import torch
import torch.nn.functional as F

from engine import distill as Dm
from engine.checkpoint import convert_hf_bert, load_model, save_model
from engine.text_data import distillation_texts

torch.set_num_threads(2)
seed, steps, lr, bs, max_len = 0, 1500, 1.5e-4, 16, 96
torch.manual_seed(seed)
tdir = Dm.default_teacher()
teacher = load_model(tdir)
student = convert_hf_bert(tdir, ffn="none", name="minilm-l6-no-ffn-e2e1500")
model = student.model
chunks = Dm.token_chunks(teacher, distillation_texts("standard"), max_len, seed)
order = torch.randperm(len(chunks), generator=Dm._gen(seed, 1)).tolist()
chunks = [chunks[i] for i in order]
for p in model.embeddings.parameters():
    p.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
optim = torch.optim.Adam(params, lr=lr)
model.train()
teacher.model.eval()
t0 = time.monotonic()
n_layers = len(model.layers)
for step in range(steps):
    idx = torch.randint(0, len(chunks), (bs,), generator=Dm._gen(seed, 4, step))
    ids, mask = Dm._batch(teacher, chunks, idx)
    with torch.no_grad():
        t_layers = Dm.layer_outputs(teacher.model, ids, mask)
        t_emb = Dm.sentence_embedding(teacher.model, t_layers[-1], mask)
    s_layers = Dm.layer_outputs(model, ids, mask)
    s_emb = Dm.sentence_embedding(model, s_layers[-1], mask)
    m = mask.bool()
    hid = sum(F.mse_loss(s[m], t[m]) for s, t in zip(s_layers, t_layers)) / n_layers
    emb = (1 - (s_emb * t_emb).sum(-1)).mean()
    loss = hid + emb
    for g in optim.param_groups:
        g["lr"] = Dm._cosine_lr(lr, step, steps, min(20, max(1, steps // 50)))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step} loss {loss.item():.4f} hidden MSE {hid.item():.4f} cosine {1 - emb.item():.4f} "
              f"{time.monotonic() - t0:.0f} s", flush=True)
model.eval()
for p in model.parameters():
    p.requires_grad_(True)
save_model(student, "runs/zero-neuron-e2e/model", dtype=torch.float16)
print("saved", time.monotonic() - t0)
