"""The Hugging Face BERT format: ``config.json`` with ``model_type: "bert"``, loaded as the dense ``bert`` layout
(:data:`HF_BERT_RULES`; a ``bert.`` prefix is stripped; pooler, MLM and classifier heads are ignored, so it serves
embeddings). engine/checkpoint/convert.py turns such a teacher into an FFF student."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.common import (
    WEIGHTS_FILE,
    CheckpointError,
    Rules,
    fill_model,
    make_config,
    read_json,
    read_safetensors,
    rename,
)
from engine.config import ModelConfig
from engine.model import UltraFastBert

NAME = "hf-bert"

HF_BERT_RULES: Rules = [
    (r"embeddings\.word_embeddings\.weight", r"embeddings.word_embeddings.weight"),
    (r"embeddings\.position_embeddings\.weight", r"embeddings.position_embeddings.weight"),
    (r"embeddings\.token_type_embeddings\.weight", r"embeddings.token_type_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"layers.\1.attention.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attention.out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn.dense_in.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn.dense_out.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
]
HF_BERT_IGNORED = r"embeddings\.position_ids|pooler\..*|cls\..*|classifier\..*"


def detect(folder: Path) -> bool:
    path = folder / "config.json"
    return path.is_file() and read_json(path).get("model_type") == "bert"


def load(folder: Path) -> tuple[ModelConfig, UltraFastBert]:
    config = config_from(read_json(folder / "config.json"), folder)
    model = UltraFastBert(config)
    fill_model(model, tensors_from(folder), f"{folder / WEIGHTS_FILE} (Hugging Face BERT format)")
    return config, model


def config_from(cfg: dict[str, Any], folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{cfg_path}: unsupported hidden_act {cfg.get('hidden_act')!r} (only exact 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{cfg_path}: unsupported position_embedding_type {cfg['position_embedding_type']!r}")
    pooling, normalize = "mean", True
    st_pooling = folder / "1_Pooling" / "config.json"
    if st_pooling.is_file():  # sentence-transformers folders say how they pool
        pooling = "cls" if read_json(st_pooling).get("pooling_mode_cls_token") else "mean"
    fields = {
        "layout": "bert",
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_hidden_layers"),
        "num_heads": cfg.get("num_attention_heads"),
        "ffn": "dense",
        "intermediate_size": cfg.get("intermediate_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings", 512),
        "type_vocab_size": cfg.get("type_vocab_size", 2),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "pad_token_id": cfg.get("pad_token_id", 0) or 0,
        "pooling": pooling,
        "normalize": normalize,
        "name": folder.name,
    }
    return make_config(fields, cfg_path)


def tensors_from(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file() and (folder / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{folder} has only pytorch_model.bin; convert it to {WEIGHTS_FILE} first")
    raw = read_safetensors(path)
    cleaned = {}
    for name, tensor in raw.items():
        name = name[len("bert.") :] if name.startswith("bert.") else name
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        cleaned[name] = tensor
    return rename(cleaned, HF_BERT_RULES, HF_BERT_IGNORED)
