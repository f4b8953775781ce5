"""What every checkpoint format shares: the loaded result, the error type, file readers that name the file in
every error, and the strict state-dict fill."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.cmm import WEIGHT_DTYPES
from engine.config import ModelConfig
from engine.model import UltraFastBert
from engine.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint folder cannot be loaded; the message names the file and the problem."""


@dataclass
class LoadedModel:
    """A ready-to-serve model (eval mode) with everything needed to run and to save it again."""

    model: UltraFastBert
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    name: str
    source_format: str = "ufb"  # "ufb", "crammedBERT" or "hf-bert"
    weight_dtype: torch.dtype = torch.float32


Rules = list[tuple[str, str]]


def rename(tensors: dict[str, torch.Tensor], rules: Rules, ignored: str) -> dict[str, torch.Tensor]:
    """Source names -> ours. A name no rule knows is kept as it is, so it is reported as unexpected."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    skip = re.compile(ignored)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if skip.fullmatch(name):
            continue
        for pattern, target in compiled:
            if pattern.fullmatch(name):
                out[pattern.sub(target, name)] = tensor
                break
        else:
            out[name] = tensor
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file after checking its header, so a truncated download is called truncated."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"weights file {path} is truncated or empty ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > 100_000_000:
            raise CheckpointError(f"weights file {path} is not a safetensors file (implausible header length)")
        if header_len > size - 8:
            raise CheckpointError(
                f"weights file {path} is truncated: its header needs {header_len} bytes, "
                f"the file has {size - 8} after the length prefix"
            )
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(f"weights file {path} is not a safetensors file (unreadable header)") from None
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"weights file {path} is truncated: expected {expected} bytes, found {size}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None


def load_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_folder(folder)
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {exc}") from None


def make_config(fields: dict[str, Any], source: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def fill_model(model: UltraFastBert, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a readable report: missing, unexpected and wrong-shape tensors are listed by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: found {tuple(tensors[k].shape)}, the config implies {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_short(wrong)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config ({model.config.layout} layout, "
            f"{model.config.num_layers} layers, hidden {model.config.hidden_size}, ffn "
            f"{model.config.ffn}): " + "; ".join(problems)
        )
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name} contains NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def finish(model: UltraFastBert, weight_dtype: torch.dtype, ffn_impl: str | None) -> UltraFastBert:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype}")
    model.set_ffn_weight_dtype(weight_dtype)
    if ffn_impl is not None:
        model.set_ffn_impl(ffn_impl)
    model.pack_inference_weights()
    return model.eval()
