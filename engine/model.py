"""The encoder: BERT (post-LN) or crammedBERT (pre-LN) layout, with an FFF, dense, or removed feedforward.

Design choices that matter for serving:

* Padding never changes a real token's result: attention uses an additive mask, positions start at 0 for every
  sequence (right padding), and the FFN runs on the real tokens only (gathered, then scattered back). A sequence's
  embedding is therefore the same alone and inside a padded batch, and FFF neuron counts are exact.
* Inference has no Python loop over tokens; attention is ``scaled_dot_product_attention``.
* The classification head reads the masked mean of the final hidden states (see :class:`ClassificationHead`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.derived import Derived
from engine.fff import FFF


# ---------------------------------------------------------------------------------------------------- embeddings


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """crammedBERT's fixed table: sin on even channels, cos on odd ones, frequencies 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class Embeddings(nn.Module):
    """Word + position (+ token type) embeddings, then LayerNorm (both layouts normalise here)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layout = config.layout
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        if config.layout == "bert":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        else:
            # Fixed sinusoids times one learned scalar; the table is rebuilt, never stored.
            self.position_scale = nn.Parameter(torch.tensor([1.0 / math.sqrt(h)]))
            self.register_buffer("sinusoids", sinusoids(config.max_position_embeddings, h), persistent=False)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        if self.layout == "bert":
            x = x + self.position_embeddings.weight[:seq_len]
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        else:
            x = x + self.position_scale * self.sinusoids[:seq_len]
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention plus its output projection.

    BERT keeps separate ``query``/``key``/``value`` projections with biases. crammedBERT has one bias-free ``qkv``
    projection whose outputs are grouped per head: ``[heads, 3 * head_dim]`` split into q, k, v (GPT-NeoX order).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.layout = config.layout
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        if config.layout == "bert":
            self.query = nn.Linear(h, h)
            self.key = nn.Linear(h, h)
            self.value = nn.Linear(h, h)
        else:
            self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=config.layout == "bert")
        self._fused: Derived[tuple[torch.Tensor, torch.Tensor]] = Derived()

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's three projections as one ``[3h, h]`` weight and bias, for inference.

        Why: one GEMM instead of three small ones; attention projections are most of what is left of the
        FFF model's cost. A copy, rebuilt when a parameter changes (in place or replaced; engine.derived), like
        the FFF's packed kernel weights; training keeps the three parameters (names match BERT checkpoints)."""
        params = [m._parameters[n] for m in (self.query, self.key, self.value) for n in ("weight", "bias")]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return torch.cat(params[0::2]), torch.cat(params[1::2])

        return self._fused.get(params, build)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.layout == "bert" and torch.is_grad_enabled():
            q, k, v = (proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                       for proj in (self.query, self.key, self.value))
        elif self.layout == "bert":
            weight, bias = self.fused_qkv()
            fused = F.linear(x, weight, bias).view(b, t, 3, self.num_heads, self.head_dim)
            q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            fused = self.qkv(x).view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2)
            q, k, v = fused.split(self.head_dim, dim=-1)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)  # scale 1/sqrt(head_dim)
        return self.out(context.transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------------- feedforward


class DenseFFN(nn.Module):
    """The classic feedforward ``Linear -> GELU -> Linear``; names follow crammedBERT's ``dense_in``/``dense_out``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.dense_in = nn.Linear(hidden, intermediate, bias=bias)
        self.dense_out = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_out(F.gelu(self.dense_in(x)))


class NoFFN(nn.Module):
    """The feedforward removed (outputs zero): the Amdahl bound of a perfectly fast FFN, and an ablation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def build_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "fff":
        return FFF(config.hidden_size, config.hidden_size, config.fff_depth, config.fff_trees,
                   bias_out=config.layout == "bert")
    if config.ffn == "dense":
        return DenseFFN(config.hidden_size, config.intermediate_size, bias=config.layout == "bert")
    return NoFFN()


# ---------------------------------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module):
    """One transformer layer. ``attn_norm``/``ffn_norm`` sit after the residual (bert) or before the branch
    (crammed: ``norm1``/``norm2``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.layout == "crammed"
        self.attention = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = build_ffn(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _ffn_on_real_tokens(self, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """FFN on the real tokens only (``real`` indexes the flattened [B*T] positions; None = all real)."""
        b, t, h = x.shape
        if real is None:
            return self.ffn(x)
        out = self.ffn(x.reshape(b * t, h).index_select(0, real))
        return x.new_zeros(b * t, h).index_copy(0, real, out).view(b, t, h)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.attn_norm(x), additive_mask)
            return x + self._ffn_on_real_tokens(self.ffn_norm(x), real)
        x = self.attn_norm(x + self.attention(x, additive_mask))
        return self.ffn_norm(x + self._ffn_on_real_tokens(x, real))


class ClassificationHead(nn.Module):
    """Pooled embedding -> optional ``dense`` + tanh (crammedBERT's pooler) -> ``classifier``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.dense: nn.Linear | None = None
        if config.classifier_dim is not None:
            self.dense = nn.Linear(config.hidden_size, config.classifier_dim)
            width = config.classifier_dim
        self.classifier = nn.Linear(width, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.classifier(pooled)


# ---------------------------------------------------------------------------------------------------- model


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens; padding contributes nothing (unlike crammedBERT's plain mean over all positions)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class UltraFastBert(nn.Module):
    """Encoder + pooling (+ optional classification head). The public API the service depends on."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) \
            if config.layout == "crammed" else None
        self.head = ClassificationHead(config) if config.labels is not None else None

    # ------------------------------------------------------------------ forward passes

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, T, H]``; rows at padded positions are meaningless."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        keep = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids)
        # Additive mask [B, 1, 1, T]: a large negative (not -inf) so a fully padded row cannot produce NaNs.
        additive_mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        additive_mask = additive_mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
        real = None if bool(keep.all()) else keep.flatten().nonzero().squeeze(1)
        for layer in self.layers:
            x = layer(x, additive_mask, real)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool | None = None
    ) -> torch.Tensor:
        """Sentence embeddings ``[B, H]``: pooled per config, L2-normalised per config unless overridden."""
        pooled = self.pool(self(input_ids, attention_mask), attention_mask)
        if self.config.normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_labels]`` from the masked mean of the final hidden states (never normalised)."""
        if self.head is None:
            raise ValueError(f"model {self.config.name!r} has no classification head (its config has no labels)")
        return self.head(masked_mean(self(input_ids, attention_mask), attention_mask))

    # ------------------------------------------------------------------ FFF controls and metrics

    def fffs(self) -> list[FFF]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, FFF)]

    def tree_shape(self) -> tuple[int, int] | None:
        """``(K, D)`` of the FFF layers, None for a dense or removed feedforward."""
        if self.config.ffn != "fff":
            return None
        return self.config.fff_trees, self.config.fff_depth

    def neurons_per_token(self) -> list[tuple[int, int]]:
        """Per layer ``(neurons evaluated per token, dense-equivalent width)``."""
        c = self.config
        evaluated = {"fff": c.fff_trees * (c.fff_depth + 1), "dense": c.intermediate_size, "none": 0}[c.ffn]
        return [(evaluated, c.intermediate_size)] * c.num_layers

    def set_ffn_impl(self, impl: str) -> None:
        for fff in self.fffs():
            fff.impl = impl

    def set_ffn_weight_dtype(self, dtype: torch.dtype) -> None:
        """Dtype of the packed kernel weights (float32 or bfloat16); parameters themselves stay float32."""
        for fff in self.fffs():
            fff.weight_dtype = dtype

    def set_record_leaves(self, on: bool) -> None:
        """Keep each FFF's leaves of the latest forward. This is per-module state: with several threads running
        forwards on one model, read leaves only from a single inference thread."""
        for fff in self.fffs():
            fff.record_leaves = on
            fff.last_leaves = None

    def last_leaves(self) -> list[torch.Tensor] | None:
        """Per layer ``[n_real_tokens, K]`` leaves of the most recent forward; None unless recording FFF leaves."""
        fffs = self.fffs()
        if not fffs or any(f.last_leaves is None for f in fffs):
            return None
        return [f.last_leaves for f in fffs]

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic random weights (BERT-style normal(0, 0.02), reference FFF init), for tests and
        from-scratch students. LayerNorms get a little noise so that tests exercise their parameters."""
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, FFF):
                module.reset_parameters(gen)
            elif isinstance(module, nn.Linear) and not _inside_fff(self, module):
                module.weight.normal_(0.0, 0.02, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.normal_(0.0, 0.1, generator=gen)
        if self.config.layout == "crammed":
            self.embeddings.position_scale.fill_(1.0 / math.sqrt(self.config.hidden_size))


def _inside_fff(model: nn.Module, linear: nn.Linear) -> bool:
    return any(linear is f.linear_in or linear is f.linear_out for f in model.modules() if isinstance(f, FFF))
