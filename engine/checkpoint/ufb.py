"""Our folder format: ``ufb_config.json`` (:class:`ModelConfig`) + ``model.safetensors`` (our state-dict names) +
tokenizer files. :func:`save_model` writes it and :func:`load` reads it back bit-identically."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint.common import (
    WEIGHTS_FILE,
    CheckpointError,
    LoadedModel,
    fill_model,
    make_config,
    read_json,
    read_safetensors,
)
from engine.config import CONFIG_FILE, ModelConfig
from engine.model import UltraFastBert

NAME = "ufb"


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def load(folder: Path) -> tuple[ModelConfig, UltraFastBert]:
    cfg_path = folder / CONFIG_FILE
    config = make_config(read_json(cfg_path), cfg_path)
    model = UltraFastBert(config)
    fill_model(model, read_safetensors(folder / WEIGHTS_FILE), f"{folder / WEIGHTS_FILE}")
    return config, model


SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def save_model(loaded: LoadedModel, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write our folder format; :func:`load_model` gives back bit-identical tensors, config and tokenizer.

    ``dtype`` stores the floating-point tensors in float16 or bfloat16 to halve the file (shipped models);
    loading upcasts them to float32, so a model saved, loaded and saved again in the same dtype is bit-identical.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {SAVE_DTYPES}, got {dtype}")
    folder = Path(path)
    state = {}
    for name, value in loaded.model.state_dict().items():
        value = value.detach().contiguous().cpu()
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                raise CheckpointError(f"refusing to save {folder}: tensor {name} contains NaN or infinite values")
            narrow = value.to(dtype)
            # A tensor beyond the 16-bit range (a float16 overflow becomes inf) stays float32: a sentiment head fitted
            # on unscaled features once had one weight above 65504. Loading upcasts every tensor anyway.
            value = narrow if torch.isfinite(narrow).all() else value.float()
        state[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first, so an interrupted save never leaves a truncated model.safetensors.
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(state, str(tmp_path), metadata={"format": "pt", "producer": "ultrafastbert-serve"})
        tmp_path.replace(folder / WEIGHTS_FILE)
    finally:
        tmp_path.unlink(missing_ok=True)
    loaded.config.save(folder / CONFIG_FILE)
    loaded.tokenizer.save(folder)
    return folder
