"""The published crammedBERT(-FFF) layout (UltraFastBERT-1x11-long): pre-LN, embedding LayerNorm, final LayerNorm,
scaled-sinusoidal positions, per-head fused QKV without bias, no token types, no biases in attention or FFN.

Module names are ours; engine/checkpoint/crammed.py maps the published checkpoint's names onto them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine import linear as dense
from engine.layers import Embeddings, EncoderLayer, Layout, SelfAttention
from engine.packing import Packing

if TYPE_CHECKING:
    from engine.config import ModelConfig


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """crammedBERT's fixed table: sin on even channels, cos on odd ones, frequencies 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class CrammedEmbeddings(Embeddings):
    """Word embeddings + fixed sinusoids times one learned scalar, then LayerNorm. The table is rebuilt, never
    stored."""

    sinusoids: torch.Tensor  # a non-persistent buffer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_scale = nn.Parameter(torch.tensor([1.0 / math.sqrt(h)]))
        self.register_buffer("sinusoids", sinusoids(config.max_position_embeddings, h), persistent=False)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def add_positions(
        self, x: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return x + self.position_scale * self.sinusoids[positions]

    @torch.no_grad()
    def reset_layout_parameters(self) -> None:
        self.position_scale.fill_(1.0 / math.sqrt(self.word_embeddings.embedding_dim))


class CrammedSelfAttention(SelfAttention):
    """One bias-free ``qkv`` projection whose outputs are grouped per head: ``[heads, 3 * head_dim]`` split into
    q, k, v (GPT-NeoX order)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.qkv.weight.detach(), None

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.qkv if self.qkv_module is None else self.qkv_module
        return dense.apply(proj, x).unflatten(-1, (self.num_heads, 3, self.head_dim)).transpose(-3, -2)


class CrammedLayer(EncoderLayer):
    """Pre-LN: each norm (crammedBERT's ``norm1``/``norm2``) comes before its branch."""

    attention_class = CrammedSelfAttention
    ffn_bias = False

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), additive_mask)
        return x + self.ffn_on_real_tokens(self.ffn_norm(x), real)

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = x + self.attention.forward_packed(self.attn_norm(x), packing)
        return x + self.ffn(self.ffn_norm(x))


def problems(config: ModelConfig) -> list[str]:
    if config.hidden_size % 2 != 0:
        return ["the crammed layout's sinusoidal positions need an even hidden_size"]
    return []


LAYOUT = Layout(name="crammed", embeddings=CrammedEmbeddings, layer=CrammedLayer, final_norm=True, problems=problems)
