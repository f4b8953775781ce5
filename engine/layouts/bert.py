"""The Hugging Face BERT layout: post-LN, learned absolute positions, token-type embeddings, biases everywhere.

Teachers such as all-MiniLM-L6-v2 and the FFF students distilled from them use it. Module names follow BERT
checkpoints' (``query``/``key``/``value``), so the name map (engine/checkpoint/hf_bert.py) stays short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine import linear as dense
from engine.derived import Derived
from engine.layers import Embeddings, EncoderLayer, Layout, SelfAttention
from engine.packing import Packing

if TYPE_CHECKING:
    from engine.config import ModelConfig


class BertEmbeddings(Embeddings):
    """Word + learned position + token type embeddings, then LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def add_positions(
        self, x: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.position_embeddings(positions)
        if token_type_ids is None:
            return x + self.token_type_embeddings.weight[0]
        return x + self.token_type_embeddings(token_type_ids)


class BertSelfAttention(SelfAttention):
    """Separate ``query``/``key``/``value`` projections with biases, fused into one GEMM at inference."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.out = nn.Linear(h, h)
        self._fused: Derived[tuple[torch.Tensor, torch.Tensor]] = Derived()

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three projections as one ``[3h, h]`` weight and bias, for inference.

        Why: one GEMM instead of three small ones; attention projections are most of what is left of the
        FFF model's cost. A copy, rebuilt when a parameter changes (in place or replaced; engine.derived), like
        the FFF's packed kernel weights; training keeps the three parameters (names match BERT checkpoints)."""
        params = [m._parameters[n] for m in (self.query, self.key, self.value) for n in ("weight", "bias")]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return torch.cat(params[0::2]), torch.cat(params[1::2])  # type: ignore[arg-type]

        return self._fused.get(params, build)  # type: ignore[arg-type]

    def pack_inference_weights(self) -> None:
        self.projection_weights()

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_module is not None:
            fused = dense.apply(self.qkv_module, x)
        elif torch.is_grad_enabled():
            fused = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        else:
            weight, bias = self.projection_weights()
            fused = dense.linear(x, weight, bias)
        return fused.unflatten(-1, (3, self.num_heads, self.head_dim))


class BertLayer(EncoderLayer):
    """Post-LN: each norm follows its residual sum."""

    attention_class = BertSelfAttention
    ffn_bias = True

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.attention(x, additive_mask))
        return self.ffn_norm(x + self.ffn_on_real_tokens(x, real))

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = self.attn_norm(x + self.attention.forward_packed(x, packing))
        return self.ffn_norm(x + self.ffn(x))


def problems(config: ModelConfig) -> list[str]:
    if not (isinstance(config.type_vocab_size, int) and config.type_vocab_size >= 1):
        return [f"type_vocab_size must be >= 1 for the bert layout, got {config.type_vocab_size!r}"]
    return []


LAYOUT = Layout(name="bert", embeddings=BertEmbeddings, layer=BertLayer, final_norm=False, problems=problems)
