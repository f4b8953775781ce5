"""UltraFastBERT inference engine: model, FFF layer, tokenizer and checkpoints. Never imports ``service``."""

from engine.checkpoint import (
    CheckpointError,
    LoadedModel,
    build_tiny_model,
    convert_hf_bert,
    load_model,
    save_model,
)
from engine.config import ModelConfig
from engine.fff import FFF
from engine.model import UltraFastBert
from engine.tokenizer import InputTooLongError, Tokenizer

__all__ = [
    "CheckpointError",
    "FFF",
    "InputTooLongError",
    "LoadedModel",
    "ModelConfig",
    "Tokenizer",
    "UltraFastBert",
    "build_tiny_model",
    "convert_hf_bert",
    "load_model",
    "save_model",
]
