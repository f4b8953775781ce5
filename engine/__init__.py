"""UltraFastBERT inference engine: model, layouts, FFF layer, tokenizer, checkpoints and batching.

Never imports ``service``; training lives in ``engine.training`` and the benchmark in ``engine.bench``, neither of
which serving imports.
"""

from engine.checkpoint import CheckpointError, LoadedModel, convert_hf_bert, load_model, save_model
from engine.config import ModelConfig
from engine.fff import FFF
from engine.model import UltraFastBert
from engine.tokenizer import InputTooLongError, Tokenizer

__all__ = [
    "FFF",
    "CheckpointError",
    "InputTooLongError",
    "LoadedModel",
    "ModelConfig",
    "Tokenizer",
    "UltraFastBert",
    "convert_hf_bert",
    "load_model",
    "save_model",
]
