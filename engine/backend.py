"""The model side of batching: what the batcher needs from a model (:class:`Backend`, as TEI's backends/core
trait) and :class:`ModelBackend`, which runs batches through a loaded :class:`engine.model.UltraFastBert`.

The batcher (engine/batcher.py) owns the queue and the batching policy; a backend only tokenizes and runs one
formed batch. A new way to run the model (another device, a compiled graph) is a new backend, not a batcher change.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from enum import Enum
from typing import Any, Protocol

import torch

from engine.errors import InputTooLong
from engine.packing import DEFAULT_MAX_PADDING_RATIO
from engine.precision import COMPUTE_DTYPES, quantize_int8


class Task(str, Enum):
    """What a batch computes; inputs of different tasks never share a forward pass."""

    EMBED = "embed"
    CLASSIFY = "classify"
    EMBED_ALL = "embed_all"  # every token's final hidden state (TEI's /embed_all): one [len, H] tensor per input


# A batch's outputs: one row per input ([B, dim]), or for Task.EMBED_ALL one [len_i, dim] tensor per input.
Outputs = torch.Tensor | list[torch.Tensor]


class Backend(Protocol):
    """What the batcher needs from a model; :class:`ModelBackend` adapts ``engine.checkpoint.LoadedModel``."""

    vocab_size: int
    max_input_tokens: int

    def tokenize(self, texts: Sequence[str], *, max_length: int, truncate: bool, direction: str) -> list[list[int]]: ...

    def forward(
        self, task: Task, ids: Sequence[Sequence[int]], record_leaves: bool
    ) -> tuple[Outputs, list[torch.Tensor] | None]: ...


class ModelBackend:
    """Runs batches through a loaded model; the batcher's inference workers call :meth:`forward`, possibly at once
    (the model is only read, and FFF leaves are recorded per thread)."""

    COMPUTE_DTYPES = tuple(COMPUTE_DTYPES.values())

    def __init__(
        self,
        loaded: Any,
        max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if compute_dtype not in self.COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {self.COMPUTE_DTYPES}, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        # int8: a quantized copy serves; the loaded model stays float32 for whoever else holds it
        self.model = quantize_int8(loaded.model) if compute_dtype == torch.qint8 else loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.vocab_size = int(getattr(self.tokenizer, "vocab_size", self.config.vocab_size))
        self.max_input_tokens = int(self.config.max_position_embeddings)
        self.tree_depth: int | None = self.model.tree_depth() if hasattr(self.model, "tree_depth") else None
        self._recording: bool | None = None
        self._recording_lock = threading.Lock()
        self.max_padding_ratio = max_padding_ratio

    def tokenize(self, texts: Sequence[str], *, max_length: int, truncate: bool, direction: str) -> list[list[int]]:
        from engine.tokenizer import InputTooLongError  # local: keep the batcher importable without it

        try:
            return self.tokenizer.encode(list(texts), max_length=max_length, truncate=truncate, direction=direction)
        except InputTooLongError as exc:
            raise InputTooLong(exc.index, exc.n_tokens, exc.max_length) from None

    def forward(
        self, task: Task, ids: Sequence[Sequence[int]], record_leaves: bool
    ) -> tuple[Outputs, list[torch.Tensor] | None]:
        """Rows of the output follow ``ids``; leaves (per layer, [real tokens, K]) come in no set order."""
        record = record_leaves and self.tree_depth is not None
        if record != self._recording:
            with self._recording_lock:  # workers share the model: switch once (switching drops recorded leaves)
                if record != self._recording:
                    self.model.set_record_leaves(record)
                    self._recording = record
        # bfloat16: autocast runs linears and attention in bf16 (AMX / AVX-512-BF16 where the CPU has them);
        # LayerNorms, pooling and the FFF kernel's activations stay fp32.
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)
        with torch.inference_mode(), autocast:
            out: Outputs
            if task is Task.EMBED:
                out = self.model.embed_ids(ids, normalize=False, max_padding_ratio=self.max_padding_ratio)
            elif task is Task.EMBED_ALL:
                out = self.model.token_states_ids(ids, max_padding_ratio=self.max_padding_ratio)
            else:
                out = self.model.classify_ids(ids, max_padding_ratio=self.max_padding_ratio)
        out = out.float() if isinstance(out, torch.Tensor) else [t.float() for t in out]
        return out, (self.model.last_leaves() if record else None)
