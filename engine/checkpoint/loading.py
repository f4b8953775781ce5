"""Finding a folder's format and loading it: each format (a module here) says whether a folder is its own
(``detect``) and loads it (``load``); :data:`FORMATS` are tried in order, so a folder with our ``ufb_config.json``
is ours even when it also carries a ``config.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from engine.checkpoint import crammed, hf_bert, ufb
from engine.checkpoint.common import CheckpointError, LoadedModel, finish, load_tokenizer, read_json
from engine.config import CONFIG_FILE, ModelConfig
from engine.model import UltraFastBert


class Format(Protocol):
    """What a checkpoint format module provides (engine/checkpoint/ufb.py is the simplest)."""

    NAME: str

    def detect(self, folder: Path) -> bool: ...

    def load(self, folder: Path) -> tuple[ModelConfig, UltraFastBert]: ...


FORMATS: tuple[Format, ...] = (ufb, crammed, hf_bert)  # modules satisfy Format


def detect_format(folder: Path) -> str:
    """The :data:`FORMATS` name of the first format that recognises ``folder``; CheckpointError for anything else."""
    return _format_of(folder).NAME


def _format_of(folder: Path) -> Format:
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"model path {folder} is not a folder")
    for fmt in FORMATS:
        if fmt.detect(folder):
            return fmt
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model folder {folder} has neither {CONFIG_FILE} nor config.json")
    model_type = read_json(folder / "config.json").get("model_type")
    raise CheckpointError(
        f"{folder / 'config.json'}: unsupported model_type {model_type!r} (expected 'crammedBERT' or 'bert')"
    )


def load_model(
    path: str | Path, *, weight_dtype: torch.dtype = torch.float32, ffn_impl: str | None = None
) -> LoadedModel:
    """Load any supported folder (format detected) into an eval-mode model plus its tokenizer.

    ``weight_dtype`` is the dtype of the packed FFF kernel weights (bfloat16 or float16 halve their memory traffic;
    float16 raises ValueError for weights beyond its range, |w| > 65504);
    parameters stay float32. ``ffn_impl`` selects the FFF implementation ("kernel", "reference", "masked").
    """
    folder = Path(path)
    fmt = _format_of(folder)
    config, model = fmt.load(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {config.vocab_size}: config and tokenizer do not match"
        )
    finish(model, weight_dtype, ffn_impl)
    return LoadedModel(model, tokenizer, config, folder, config.name, fmt.NAME, weight_dtype)
