"""The published crammedBERT(-FFF) format (UltraFastBERT-1x11-long): ``config.json`` with ``model_type:
"crammedBERT"`` and an ``arch`` dict, loaded into the ``crammed`` layout.

Names map as in :data:`CRAMMED_RULES`; ``decoder.*`` (the tied MLM decoder), ``prediction_head.*`` and the
``norm_factor`` buffers are ignored. Classification checkpoints' ``pooler.dense`` becomes ``head.dense`` and
``head`` becomes ``head.classifier``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

NAME = "crammedBERT"

CRAMMED_RULES: Rules = [
    (r"encoder\.embedding\.word_embedding\.weight", r"embeddings.word_embeddings.weight"),
    (r"encoder\.embedding\.pos_embedding\.scale_factor", r"embeddings.position_scale"),
    (r"encoder\.embedding\.norm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    (r"encoder\.layers\.(\d+)\.attn\.self_attention\.query_key_value\.weight", r"layers.\1.attention.qkv.weight"),
    (r"encoder\.layers\.(\d+)\.attn\.dense\.weight", r"layers.\1.attention.out.weight"),
    (r"encoder\.layers\.(\d+)\.ffn\.(linear_in\.weight|linear_in\.bias|linear_out\.weight)", r"layers.\1.ffn.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.(dense_in|dense_out)\.weight", r"layers.\1.ffn.\2.weight"),
    (r"encoder\.final_norm\.(weight|bias)", r"final_norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"head.dense.\1"),
    (r"head\.(weight|bias)", r"head.classifier.\1"),
]
CRAMMED_IGNORED = (
    r"decoder\..*|prediction_head\..*|encoder\.layers\.\d+\.attn\.self_attention\.norm_factor"
    r"|encoder\.embedding\.pos_embedding\.pe"
)

# Options of the published architecture this engine implements; anything else is refused, not guessed.
CRAMMED_REQUIRED: dict[str, Any] = {
    "norm": "LayerNorm",
    "nonlin": "GELU",
    "use_bias": False,
    "final_norm": True,
    "embedding.pos_embedding": "scaled-sinusoidal",
    "embedding.normalization": True,
    "attention.type": "self-attention",
    "attention.qkv_bias": False,
    "attention.rotary_embedding": False,
    "attention.causal_attention": False,
    "attention.skip_output_projection": False,
    "attention.sequence_op": "torch-softmax",
}


def detect(folder: Path) -> bool:
    path = folder / "config.json"
    return path.is_file() and read_json(path).get("model_type") == "crammedBERT"


def load(folder: Path) -> tuple[ModelConfig, UltraFastBert]:
    config = config_from(read_json(folder / "config.json"), folder / "config.json", folder)
    model = UltraFastBert(config)
    tensors = rename(read_safetensors(folder / WEIGHTS_FILE), CRAMMED_RULES, CRAMMED_IGNORED)
    fill_model(model, tensors, f"{folder / WEIGHTS_FILE} (crammedBERT format)")
    return config, model


def config_from(cfg: dict[str, Any], cfg_path: Path, folder: Path) -> ModelConfig:
    arch = cfg.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{cfg_path}: a crammedBERT config needs an 'arch' object")

    def get(dotted: str, default: Any = None) -> Any:
        node: Any = arch
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    for key, want in CRAMMED_REQUIRED.items():
        have = get(key, want)
        if have != want and not (want is False and not have):
            raise CheckpointError(
                f"{cfg_path}: unsupported crammedBERT option arch.{key}={have!r} (this engine implements {want!r})"
            )
    hidden = get("hidden_size")
    if get("embedding.embedding_dim", hidden) != hidden:
        raise CheckpointError(f"{cfg_path}: embedding_dim must equal hidden_size")
    intermed_type = get("intermed_type", "ff")
    if intermed_type not in ("fff", "ff"):
        raise CheckpointError(f"{cfg_path}: unsupported intermed_type {intermed_type!r}")
    num_labels = get("num_labels")
    labels = None
    if num_labels:
        id2label = cfg.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(int(num_labels))]
        if get("classification_head.pooler", "avg") != "avg":
            raise CheckpointError(f"{cfg_path}: only the 'avg' classification pooler is supported")
        if get("classification_head.nonlin", "Tanh") != "Tanh":
            raise CheckpointError(f"{cfg_path}: only a Tanh classification pooler is supported")
    fields = {
        "layout": "crammed",
        "vocab_size": get("embedding.vocab_size") or cfg.get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": get("num_transformer_layers"),
        "num_heads": get("attention.num_attention_heads"),
        "ffn": "fff" if intermed_type == "fff" else "dense",
        "fff_trees": get("intermed_size", 1) if intermed_type == "fff" else 1,
        "fff_depth": get("intermed_depth", 0) if intermed_type == "fff" else 0,
        # The dense equivalent of an FFF is the crammedBERT baseline's 4 * hidden (3072 for hidden 768).
        "intermediate_size": 4 * hidden if intermed_type == "fff" and isinstance(hidden, int) else get("intermed_size"),
        "max_position_embeddings": get("embedding.max_seq_length", 128),
        "layer_norm_eps": float(get("norm_eps", 1e-12)),
        "pad_token_id": get("embedding.pad_token_id", 0),
        "labels": labels,
        "classifier_dim": get("classification_head.head_dim", 1024)
        if labels and get("classification_head.include_ff_layer", True)
        else None,
        "name": folder.name,
    }
    return make_config(fields, cfg_path)
