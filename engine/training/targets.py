"""What a student is trained to match: the per-layer outputs and sentence embeddings of a model, the teacher's FFN
input/output pairs for the layer-wise phase, and the losses and errors computed on them."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from engine.checkpoint import LoadedModel
from engine.fff import FFF
from engine.layers import EncoderLayer
from engine.model import UltraFastBert


def layer_outputs(model: UltraFastBert, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer outputs ``[B, T, H]`` (the same computation as ``UltraFastBert.forward``)."""
    keep = mask.bool()
    x = model.embeddings(input_ids, None)
    additive = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
    real = None if bool(keep.all()) else keep.flatten().nonzero().squeeze(1)
    outs = []
    for layer in model.layers:
        x = layer(x, additive, real)
        outs.append(x)
    if model.final_norm is not None:
        outs[-1] = model.final_norm(outs[-1])
    return outs


def sentence_embedding(model: UltraFastBert, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.pool(hidden, mask), dim=-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the pairwise cosine similarities within the batch (normalised embeddings).

    Why: the per-sentence cosine loss pulls each embedding towards its teacher's, but what nearest-neighbour search
    and similarity scores use is how sentences sit relative to each other; this loss targets that directly (as in
    relational knowledge distillation). The diagonal (always 1) is left out."""
    n = student.shape[0]
    if n < 2:
        return student.new_zeros(())
    off = ~torch.eye(n, dtype=torch.bool)
    return F.mse_loss((student @ student.T)[off], (teacher @ teacher.T)[off])


@torch.no_grad()
def collect_ffn_pairs(
    teacher: LoadedModel, chunks: list[list[int]], n_tokens: int, batch_size: int, progress: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher FFN inputs and outputs on real tokens, per layer, float16 ``[n, H]``."""
    model = teacher.model
    h = model.config.hidden_size
    n_layers = len(model.layers)
    xs = [torch.empty(n_tokens, h, dtype=torch.float16) for _ in range(n_layers)]
    ys = [torch.empty(n_tokens, h, dtype=torch.float16) for _ in range(n_layers)]
    filled = [0]
    pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
    hooks = []
    for i, layer in enumerate(cast("list[EncoderLayer]", model.layers)):

        def hook(_m: Any, args: tuple, out: torch.Tensor, i: int = i) -> None:
            pending[i] = (args[0].reshape(-1, h), out.reshape(-1, h))

        hooks.append(layer.ffn.register_forward_hook(hook))
    try:
        from tqdm import tqdm

        bar = tqdm(total=n_tokens, desc="caching teacher FFN pairs", unit="tok", disable=not progress)
        for start in range(0, len(chunks), batch_size):
            ids, mask = teacher.tokenizer.pad(chunks[start : start + batch_size])
            model(ids, mask)
            take = min(int(mask.sum()), n_tokens - filled[0])
            for i in range(n_layers):
                pair = pending[i]
                if pair is None:
                    raise RuntimeError(f"the hook on layer {i}'s FFN did not run")
                x, y = pair
                xs[i][filled[0] : filled[0] + take] = x[:take].half()
                ys[i][filled[0] : filled[0] + take] = y[:take].half()
            filled[0] += take
            bar.update(take)
            if filled[0] >= n_tokens:
                break
        bar.close()
    finally:
        for hk in hooks:
            hk.remove()
    return [x[: filled[0]] for x in xs], [y[: filled[0]] for y in ys]


@torch.no_grad()
def relative_error(fff: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """||fff(x) - y|| / ||y - mean(y)|| on a token sample (the FFN output's variance is the scale)."""
    was = fff.training
    fff.train(False)
    pred = fff._forward_masked(x.float())[0] if isinstance(fff, FFF) else fff(x.float())
    fff.train(was)
    yf = y.float()
    return float((pred - yf).norm() / (yf - yf.mean(0)).norm())
