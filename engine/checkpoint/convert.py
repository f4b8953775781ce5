"""Conversion: a Hugging Face BERT teacher -> an FFF student in our ``bert`` layout (distillation's starting
point; ``ultrafastbert convert``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from engine.checkpoint import hf_bert
from engine.checkpoint.common import (
    WEIGHTS_FILE,
    CheckpointError,
    LoadedModel,
    fill_model,
    finish,
    load_tokenizer,
    make_config,
    read_json,
)
from engine.checkpoint.loading import detect_format
from engine.fff import FFF
from engine.model import UltraFastBert


def convert_hf_bert(
    hf_folder: str | Path,
    *,
    trees: int | None = None,
    depth: int | None = None,
    init: str = "teacher",
    ffn: str = "fff",
    dense_layers: Sequence[int] = (),
    layer_trees: Mapping[int, int] | None = None,
    seed: int = 0,
    name: str | None = None,
) -> LoadedModel:
    """A Hugging Face BERT teacher -> our ``bert`` layout with its FFNs replaced by FFFs (``ffn="fff"``), kept
    (``"dense"``: reproduces ``transformers.BertModel``) or removed (``"none"``).

    Everything but the FFNs is copied. ``init="teacher"`` seeds each tree from the teacher's neurons: neurons are
    ranked by ``|w_in row| * |w_out column|`` (descending, ties by index), and rank ``r`` fills tree ``r % K``, node
    ``r // K`` in heap order, cycling through the ranking if the trees have more nodes than the teacher has
    neurons. The strongest neurons thus sit nearest the roots, which every token visits. ``init="random"`` uses the
    reference FFF initialisation (seeded). Either way the FFF keeps the teacher's output bias, and the config keeps
    ``intermediate_size`` = teacher width as the dense equivalent. ``dense_layers`` (FFF only) keeps the teacher's
    FFN in those layers: a hybrid (``ModelConfig.dense_ffn_layers``). ``layer_trees`` (FFF only) gives some layers
    another tree count than ``trees`` (``ModelConfig.fff_layer_trees``).
    """
    folder = Path(hf_folder)
    if detect_format(folder) != hf_bert.NAME:
        raise CheckpointError(f"{folder} is not a Hugging Face BERT folder (config.json with model_type 'bert')")
    if ffn not in ("fff", "dense", "none"):
        raise ValueError(f"ffn must be 'fff', 'dense' or 'none', got {ffn!r}")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    teacher_config = hf_bert.config_from(read_json(folder / "config.json"), folder)
    tensors = hf_bert.tensors_from(folder)
    fields = teacher_config.to_dict()
    fields.update(
        ffn=ffn,
        name=name or f"{folder.name}-{ffn}",
        extra={"teacher": str(folder), "init": init if ffn == "fff" else None},
    )
    if ffn == "fff":
        if trees is None or depth is None:
            raise ValueError("convert_hf_bert with ffn='fff' needs trees and depth")
        n = teacher_config.num_layers
        if any(not 0 <= i < n for i in dense_layers):  # the argument's fault, not the teacher's config.json
            raise ValueError(f"dense_layers {list(dense_layers)}: the teacher has layers 0..{n - 1}")
        per_layer = {int(i): k for i, k in (layer_trees or {}).items() if k != trees}
        if any(not 0 <= i < n for i in per_layer):
            raise ValueError(f"layer_trees {dict(per_layer)}: the teacher has layers 0..{n - 1}")
        fields.update(fff_trees=trees, fff_depth=depth, dense_ffn_layers=list(dense_layers), fff_layer_trees=per_layer)
    elif dense_layers or layer_trees:
        raise ValueError("dense_layers and layer_trees are for ffn='fff'")
    config = make_config(fields, folder / "config.json")
    model = UltraFastBert(config)
    ffn_tensors = {k: tensors.pop(k) for k in list(tensors) if re.fullmatch(r"layers\.\d+\.ffn\..*", k)}
    for k, v in ffn_tensors.items():
        if config.ffn_kind(int(k.split(".")[1])) == "dense":
            tensors[k] = v
    # The teacher FFN is checked by name only; FFF parameters are filled below.
    _fill_model_partial(model, tensors, ffn_tensors, folder / WEIGHTS_FILE)
    if ffn == "fff":
        gen = torch.Generator().manual_seed(seed)
        for i, layer in enumerate(model.layers):
            if isinstance(layer.ffn, FFF):
                _init_fff(layer.ffn, ffn_tensors, i, init, gen)
    finish(model, torch.float32, None)
    tokenizer = load_tokenizer(folder)
    return LoadedModel(model, tokenizer, config, folder, config.name, hf_bert.NAME, torch.float32)


def _fill_model_partial(
    model: UltraFastBert, tensors: dict[str, torch.Tensor], ffn_tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """Like :func:`fill_model`, but the FFF parameters (absent from ``tensors``; dense FFNs are in it) are left to
    the caller."""
    for i in range(model.config.num_layers):
        for part in ("dense_in.weight", "dense_in.bias", "dense_out.weight", "dense_out.bias"):
            if f"layers.{i}.ffn.{part}" not in ffn_tensors:
                raise CheckpointError(f"{source}: missing teacher FFN tensor for layer {i} ({part})")
    own_ffn = {
        k: v for k, v in model.state_dict().items() if re.fullmatch(r"layers\.\d+\.ffn\..*", k) and k not in tensors
    }
    fill_model(model, {**tensors, **own_ffn}, str(source))


@torch.no_grad()
def _init_fff(fff: FFF, teacher: dict[str, torch.Tensor], layer: int, init: str, gen: torch.Generator) -> None:
    w1 = teacher[f"layers.{layer}.ffn.dense_in.weight"].float()  # [I, H]
    b1 = teacher[f"layers.{layer}.ffn.dense_in.bias"].float()  # [I]
    w2 = teacher[f"layers.{layer}.ffn.dense_out.weight"].float()  # [H, I]
    b2 = teacher[f"layers.{layer}.ffn.dense_out.bias"].float()  # [H]
    if init == "random":
        fff.reset_parameters(gen)
    else:
        score = w1.norm(dim=1) * w2.norm(dim=0)
        order = torch.sort(score, descending=True, stable=True).indices
        rank = torch.arange(fff.trees * fff.n_nodes)
        rows = (rank % fff.trees) * fff.n_nodes + rank // fff.trees
        src = order[rank % order.numel()]
        fff.linear_in.weight[rows] = w1[src]
        fff.linear_in.bias[rows] = b1[src]
        fff.linear_out.weight[:, rows] = w2[:, src]
    fff.linear_out.bias.copy_(b2)
    fff.invalidate()
