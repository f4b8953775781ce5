"""The building blocks every encoder layout shares, and :class:`Layout`, what a layout module provides.

A layout (engine/layouts/) is one architecture's embeddings, attention projections and residual order: each
owns its module and classes, as a model does in Hugging Face transformers. What is the same for every layout lives
here: the attention core (padded and packed), the feedforward kinds, and the layer's FFN-on-real-tokens step.

Padding never changes a real token's result: attention uses an additive mask, positions start at 0 for every
sequence (right padding), and the FFN runs on the real tokens only (gathered, then scattered back).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine import attention
from engine import linear as dense
from engine.fff import FFF
from engine.packing import Packing

if TYPE_CHECKING:
    from engine.config import ModelConfig


# ---------------------------------------------------------------------------------------------------- embeddings


class Embeddings(nn.Module, ABC):
    """Word embeddings plus the layout's position terms (:meth:`add_positions`), then the LayerNorm ``norm``."""

    word_embeddings: nn.Embedding
    norm: nn.LayerNorm

    @abstractmethod
    def add_positions(
        self, x: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Word embeddings ``x`` plus the layout's position (and token type) terms at ``positions``."""

    def reset_layout_parameters(self) -> None:
        """Re-establish the layout's fixed initial values after :meth:`UltraFastBert.init_weights`."""

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` right-padded ids -> ``[B, T, H]``; positions restart at 0 in every row."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.forward_packed(input_ids, positions, token_type_ids)

    def forward_packed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ids with the position of each in its own sequence (``[N]`` packed, or ``[T]`` broadcast over a padded
        batch) -> embeddings; token type 0 unless given."""
        return self.norm(self.add_positions(self.word_embeddings(input_ids), positions, token_type_ids))


# ---------------------------------------------------------------------------------------------------- attention


class SelfAttention(nn.Module, ABC):
    """Multi-head self-attention plus its output projection ``out``; a layout supplies the q/k/v projection."""

    out: nn.Linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        # Inference only: the q/k/v projection as one module, so it can be swapped whole (int8: engine.precision).
        self.qkv_module: nn.Module | None = None

    @abstractmethod
    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., 3, heads, head_dim]`` (q, k, v)."""

    @abstractmethod
    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q/k/v projection as one ``[3H, H]`` weight and its bias, in the output order of :meth:`qkv_heads`."""

    def use_fused_projection(self) -> None:
        """From now on project q/k/v through ``qkv_module``, one ``nn.Linear`` with the same function."""
        weight, bias = self.projection_weights()
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            fused.weight.copy_(weight)
            if bias is not None:
                fused.bias.copy_(bias)
        self.qkv_module = fused

    def pack_inference_weights(self) -> None:
        """Build any inference-time copy of the projections now (see :meth:`UltraFastBert.pack_inference_weights`)."""

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_heads(x).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)  # scale 1/sqrt(head_dim)
        return dense.apply(self.out, context.transpose(1, 2).reshape(b, t, -1))

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``[N, H]`` packed tokens: projections over all of them at once, attention per sequence
        (engine/attention.py)."""
        context = attention.packed(self.qkv_heads(x), packing, self.num_heads)
        return dense.apply(self.out, context)


# ---------------------------------------------------------------------------------------------------- feedforward


class DenseFFN(nn.Module):
    """The classic feedforward ``Linear -> GELU -> Linear``; names follow crammedBERT's ``dense_in``/``dense_out``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.dense_in = nn.Linear(hidden, intermediate, bias=bias)
        self.dense_out = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense.apply(self.dense_out, F.gelu(dense.apply(self.dense_in, x)))


class NoFFN(nn.Module):
    """The feedforward removed (outputs zero): the Amdahl bound of a perfectly fast FFN, and an ablation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def build_ffn(config: ModelConfig, layer: int, bias: bool) -> nn.Module:
    """Layer ``layer``'s feedforward (:meth:`ModelConfig.ffn_kind`); ``bias`` is the layout's (an FFF keeps only
    its output bias)."""
    kind = config.ffn_kind(layer)
    if kind == "fff":
        return FFF(config.hidden_size, config.hidden_size, config.fff_depth, config.trees_in(layer), bias_out=bias)
    if kind == "dense":
        return DenseFFN(config.hidden_size, config.intermediate_size, bias=bias)
    return NoFFN()


# ---------------------------------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module, ABC):
    """One transformer layer: ``attention``, ``attn_norm``, ``ffn``, ``ffn_norm``; a layout sets the attention
    class, whether the FFN has biases, and the residual order (:meth:`forward`, :meth:`forward_packed`)."""

    attention_class: ClassVar[type[SelfAttention]]
    ffn_bias: ClassVar[bool]

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.attention = self.attention_class(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = build_ffn(config, index, bias=self.ffn_bias)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def ffn_on_real_tokens(self, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """FFN on the real tokens only (``real`` indexes the flattened [B*T] positions; None = all real)."""
        b, t, h = x.shape
        if real is None:
            return self.ffn(x)
        out = self.ffn(x.reshape(b * t, h).index_select(0, real))
        return x.new_zeros(b * t, h).index_copy(0, real, out).view(b, t, h)

    @abstractmethod
    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Padded ``[B, T, H]`` -> ``[B, T, H]``."""

    @abstractmethod
    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Packed ``[N, H]`` -> ``[N, H]``."""


# ---------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """What one layout module (engine/layouts/) registers: its classes and the checks its config needs."""

    name: str  # ModelConfig.layout
    embeddings: type[Embeddings]
    layer: type[EncoderLayer]
    final_norm: bool  # a LayerNorm after the last layer
    problems: Callable[[ModelConfig], list[str]]  # what is wrong with a config for this layout (empty: nothing)
