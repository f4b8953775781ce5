"""The encoder: BERT (post-LN) or crammedBERT (pre-LN) layout, with an FFF, dense, or removed feedforward.

Design choices that matter for serving:

* Padding never changes a real token's result: attention uses an additive mask, positions start at 0 for every
  sequence (right padding), and the FFN runs on the real tokens only (gathered, then scattered back). A sequence's
  embedding is therefore the same alone and inside a padded batch, and FFF neuron counts are exact.
* Inference has no Python loop over tokens; attention is ``scaled_dot_product_attention``.
* Serving uses the **packed** path (:meth:`UltraFastBert.embed_ids`, TEI's "unpadded" layout): a batch is one
  ``[real tokens, hidden]`` matrix, so projections, LayerNorms and the FFN run once over real tokens only, in one
  large GEMM per projection. Only the attention core needs a ``[batch, heads, T, T]`` layout; it runs per group of
  sequences of similar length (:func:`pack`), padded within the group.
* The classification head reads the masked mean of the final hidden states (see :class:`ClassificationHead`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
        """``[B, T]`` right-padded ids -> ``[B, T, H]``; positions restart at 0 in every row."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.forward_packed(input_ids, positions, token_type_ids)

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Ids with the position of each in its own sequence (``[N]`` packed, or ``[T]`` broadcast over a padded
        batch) -> embeddings; token type 0 unless given."""
        x = self.word_embeddings(input_ids)
        if self.layout == "bert":
            x = x + self.position_embeddings(positions)
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        else:
            x = x + self.position_scale * self.sinusoids[positions]
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------- packing


# No padding at all by default (see length_groups).
DEFAULT_MAX_PADDING_RATIO = 1.0


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences ``start..end`` (rows of the packed batch) whose attention runs as one padded block ``[n, t]``."""

    start: int
    end: int
    n: int
    t: int
    gather: torch.Tensor | None  # [n * t] rows (from ``start``) laid out as the padded block; None: no padding
    scatter: torch.Tensor | None  # [end - start] positions of the real tokens inside the padded block
    mask: torch.Tensor | None  # additive [n, 1, 1, t]


@dataclass(frozen=True)
class Packing:
    """How a list of sequences lies in one ``[N, H]`` matrix: sorted by length, each sequence contiguous."""

    order: torch.Tensor  # [B] input index of each packed sequence
    lengths: torch.Tensor  # [B] in packed order
    starts: torch.Tensor  # [B] first row of each packed sequence
    positions: torch.Tensor  # [N] position of each token in its sequence
    seq_index: torch.Tensor  # [N] packed sequence of each token
    groups: tuple[AttentionGroup, ...]


def length_groups(lengths: Sequence[int], max_padding_ratio: float) -> list[list[int]]:
    """Indices grouped into length-sorted groups whose padded size stays within ``max_padding_ratio`` of their
    real tokens.

    Why: attention runs on every padded position of its block, work shared by the FFF and the dense model alike.
    With packed inputs the default is no padding at all (1.0: one attention call per distinct length); more was not
    faster on realistic text lengths (``flash`` attention with a mask is slower than without, and small per-call
    costs are cheaper than padded work). docs/serving.md.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        # lengths ascend, so lengths[i] is the padded length of current + [i]
        if current and lengths[i] * (len(current) + 1) > max_padding_ratio * (real + lengths[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


def pack(ids: Sequence[Sequence[int]],
         max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> tuple[torch.Tensor, Packing]:
    """Token id lists -> ``[N]`` packed ids and their :class:`Packing` (every sequence must be non-empty)."""
    if not ids or any(len(x) == 0 for x in ids):
        raise ValueError("pack() needs at least one sequence and no empty ones")
    groups = length_groups([len(x) for x in ids], max_padding_ratio)
    order = [i for g in groups for i in g]
    lengths = [len(ids[i]) for i in order]
    starts = [0] * len(order)
    for j in range(1, len(order)):
        starts[j] = starts[j - 1] + lengths[j - 1]
    flat = [tok for i in order for tok in ids[i]]
    attention: list[AttentionGroup] = []
    seq = 0
    for g in groups:
        n, lens = len(g), lengths[seq:seq + len(g)]
        t, start = max(lens), starts[seq]
        end = start + sum(lens)
        if all(x == t for x in lens):
            attention.append(AttentionGroup(start, end, n, t, None, None, None))
        else:
            # padded slots repeat the sequence's first row: masked as keys, dropped as queries
            rel = [starts[seq + j] - start for j in range(n)]
            gather = torch.tensor([rel[j] + (p if p < lens[j] else 0) for j in range(n) for p in range(t)])
            scatter = torch.tensor([j * t + p for j in range(n) for p in range(lens[j])])
            keep = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
            mask = torch.zeros(n, t).masked_fill_(~keep, torch.finfo(torch.float32).min)[:, None, None, :]
            attention.append(AttentionGroup(start, end, n, t, gather, scatter, mask))
        seq += n
    lengths_t = torch.tensor(lengths)
    packing = Packing(order=torch.tensor(order), lengths=lengths_t, starts=torch.tensor(starts),
                      positions=torch.cat([torch.arange(x) for x in lengths]),
                      seq_index=torch.repeat_interleave(torch.arange(len(order)), lengths_t),
                      groups=tuple(attention))
    return torch.tensor(flat, dtype=torch.long), packing


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

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., 3, heads, head_dim]`` (q, k, v); one fused GEMM at inference."""
        if self.layout == "bert":
            if torch.is_grad_enabled():
                fused = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
            else:
                weight, bias = self.fused_qkv()
                fused = F.linear(x, weight, bias)
            return fused.unflatten(-1, (3, self.num_heads, self.head_dim))
        # crammedBERT groups per head: [heads, 3 * head_dim]
        return self.qkv(x).unflatten(-1, (self.num_heads, 3, self.head_dim)).transpose(-3, -2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_heads(x).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)  # scale 1/sqrt(head_dim)
        return self.out(context.transpose(1, 2).reshape(b, t, -1))

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``[N, H]`` packed tokens: projections over all of them at once, attention per length group."""
        qkv = self.qkv_heads(x)
        parts = []
        for g in packing.groups:
            rows = qkv[g.start:g.end]
            block = rows if g.gather is None else rows.index_select(0, g.gather)
            q, k, v = block.view(g.n, g.t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
            context = context.transpose(1, 2).reshape(g.n * g.t, -1)
            parts.append(context if g.scatter is None else context.index_select(0, g.scatter))
        return self.out(parts[0] if len(parts) == 1 else torch.cat(parts))


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

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention.forward_packed(self.attn_norm(x), packing)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attention.forward_packed(x, packing))
        return self.ffn_norm(x + self.ffn(x))


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
        self._check_length(input_ids.shape[1])
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

    def _check_length(self, longest: int) -> None:
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {longest} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")

    def _classification_head(self) -> ClassificationHead:
        if self.head is None:
            raise ValueError(f"model {self.config.name!r} has no classification head (its config has no labels)")
        return self.head

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
        head = self._classification_head()
        return head(masked_mean(self(input_ids, attention_mask), attention_mask))

    # ------------------------------------------------------------------ packed inference (the serving path)

    def forward_packed(self, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Final hidden states ``[N, H]`` of packed tokens (see :func:`pack`)."""
        self._check_length(int(packing.lengths.max()))
        x = self.embeddings.forward_packed(input_ids, packing.positions)
        for layer in self.layers:
            x = layer.forward_packed(x, packing)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def pooled_ids(self, ids: Sequence[Sequence[int]], *, cls: bool,
                   max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> torch.Tensor:
        """CLS or mean-pooled final hidden states ``[B, H]`` of unpadded token id lists, in input order."""
        input_ids, packing = pack(ids, max_padding_ratio)
        hidden = self.forward_packed(input_ids, packing)
        if cls:
            pooled = hidden.index_select(0, packing.starts)
        else:
            sums = hidden.new_zeros(len(ids), hidden.shape[1]).index_add_(0, packing.seq_index, hidden)
            pooled = sums / packing.lengths.to(hidden.dtype).unsqueeze(1)
        return pooled.new_empty(pooled.shape).index_copy_(0, packing.order, pooled)

    def embed_ids(self, ids: Sequence[Sequence[int]], normalize: bool | None = None,
                  max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> torch.Tensor:
        """:meth:`embed` of unpadded token id lists, ``[B, H]`` in input order; what the service runs."""
        pooled = self.pooled_ids(ids, cls=self.config.pooling == "cls", max_padding_ratio=max_padding_ratio)
        if self.config.normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def token_states_ids(self, ids: Sequence[Sequence[int]],
                         max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> list[torch.Tensor]:
        """Final hidden states of every token, one ``[len_i, H]`` tensor per input in input order (TEI's
        ``/embed_all``: no pooling, no normalisation, special tokens included)."""
        input_ids, packing = pack(ids, max_padding_ratio)
        parts = self.forward_packed(input_ids, packing).split(packing.lengths.tolist())
        out: list[torch.Tensor] = [parts[0]] * len(parts)
        for j, i in enumerate(packing.order.tolist()):
            out[i] = parts[j]
        return out

    def classify_ids(self, ids: Sequence[Sequence[int]],
                     max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> torch.Tensor:
        """:meth:`classify` of unpadded token id lists, ``[B, num_labels]`` in input order."""
        head = self._classification_head()
        return head(self.pooled_ids(ids, cls=False, max_padding_ratio=max_padding_ratio))

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

    def pack_inference_weights(self) -> None:
        """Builds the inference-time copies now (each FFF's packed kernel weights, BERT's fused Q/K/V) instead of on
        the first forward pass: loading pays for them rather than the first request, and code traced by
        ``torch.compile``, which cannot check them, finds them built. They still follow later parameter changes on
        every eager call (engine.derived)."""
        for module in self.modules():
            if isinstance(module, FFF):
                module.packed_weights()
            elif isinstance(module, SelfAttention) and module.layout == "bert":
                module.fused_qkv()

    def set_record_leaves(self, on: bool) -> None:
        """Keep each FFF's leaves of the latest forward, per calling thread (several inference workers may share
        one model). Switch it before serving, not while forwards run: switching drops every thread's leaves."""
        for fff in self.fffs():
            fff.record_leaves = on
            fff.clear_leaves()

    def last_leaves(self) -> list[torch.Tensor] | None:
        """Per layer ``[n_real_tokens, K]`` leaves of this thread's most recent forward; None unless recording."""
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
