"""The model every layout shares, and the serving API: :class:`UltraFastBert` (encoder + pooling + optional
classification head) with its packed entry points :meth:`~UltraFastBert.embed_ids`,
:meth:`~UltraFastBert.classify_ids` and :meth:`~UltraFastBert.token_states_ids`.

* The layout (``config.layout``: engine/layouts/) supplies the embeddings and the layers; nothing here depends on
  which one it is.
* Padding never changes a real token's result (engine/layers.py), so a sequence's embedding is the same alone and
  inside a padded batch, and FFF neuron counts are exact.
* Serving uses the **packed** path (engine/packing.py, TEI's "unpadded" layout): a batch is one
  ``[real tokens, hidden]`` matrix, so projections, LayerNorms and the FFN run once over real tokens only, in one
  large GEMM per projection; only the attention core runs per group of sequences of similar length.
* The classification head reads the masked mean of the final hidden states (see :class:`ClassificationHead`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.fff import FFF
from engine.layers import EncoderLayer, SelfAttention
from engine.layouts import get_layout
from engine.packing import DEFAULT_MAX_PADDING_RATIO, Packing, pack


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
        layout = get_layout(config.layout)
        self.embeddings = layout.embeddings(config)
        self.layers = nn.ModuleList(layout.layer(config, i) for i in range(config.num_layers))
        self.final_norm: nn.LayerNorm | None = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if layout.final_norm else None
        )
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
            raise ValueError(
                f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
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
            raise ValueError(
                f"sequence length {longest} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )

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
        for layer in cast("list[EncoderLayer]", self.layers):
            x = layer.forward_packed(x, packing)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def pooled_ids(
        self, ids: Sequence[Sequence[int]], *, cls: bool, max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO
    ) -> torch.Tensor:
        """CLS or mean-pooled final hidden states ``[B, H]`` of unpadded token id lists, in input order."""
        input_ids, packing = pack(ids, max_padding_ratio)
        hidden = self.forward_packed(input_ids, packing)
        if cls:
            pooled = hidden.index_select(0, packing.starts)
        else:
            sums = hidden.new_zeros(len(ids), hidden.shape[1]).index_add_(0, packing.seq_index, hidden)
            pooled = sums / packing.lengths.to(hidden.dtype).unsqueeze(1)
        return pooled.new_empty(pooled.shape).index_copy_(0, packing.order, pooled)

    def embed_ids(
        self,
        ids: Sequence[Sequence[int]],
        normalize: bool | None = None,
        max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO,
    ) -> torch.Tensor:
        """:meth:`embed` of unpadded token id lists, ``[B, H]`` in input order; what the service runs."""
        pooled = self.pooled_ids(ids, cls=self.config.pooling == "cls", max_padding_ratio=max_padding_ratio)
        if self.config.normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def token_states_ids(
        self, ids: Sequence[Sequence[int]], max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO
    ) -> list[torch.Tensor]:
        """Final hidden states of every token, one ``[len_i, H]`` tensor per input in input order (TEI's
        ``/embed_all``: no pooling, no normalisation, special tokens included)."""
        input_ids, packing = pack(ids, max_padding_ratio)
        parts = self.forward_packed(input_ids, packing).split(packing.lengths.tolist())
        out: list[torch.Tensor] = [parts[0]] * len(parts)
        for j, i in enumerate(packing.order.tolist()):
            out[i] = parts[j]
        return out

    def classify_ids(
        self, ids: Sequence[Sequence[int]], max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO
    ) -> torch.Tensor:
        """:meth:`classify` of unpadded token id lists, ``[B, num_labels]`` in input order."""
        head = self._classification_head()
        return head(self.pooled_ids(ids, cls=False, max_padding_ratio=max_padding_ratio))

    # ------------------------------------------------------------------ FFF controls and metrics

    def fffs(self) -> list[FFF]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, FFF)]

    def fff_layers(self) -> list[int]:
        """Indices of the layers whose FFN is an FFF, in the order of :meth:`fffs` and :meth:`last_leaves`."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer.ffn, FFF)]

    def tree_depth(self) -> int | None:
        """D of the FFF layers (all share it; K may differ per layer), None without FFF layers."""
        return self.config.fff_depth if self.config.ffn == "fff" else None

    def neurons_per_token(self) -> list[tuple[int, int]]:
        """Per layer ``(neurons evaluated per token, dense-equivalent width)``."""
        c = self.config

        def evaluated(layer: int) -> int:
            kind = c.ffn_kind(layer)
            if kind == "fff":
                return c.trees_in(layer) * (c.fff_depth + 1)
            return c.intermediate_size if kind == "dense" else 0

        return [(evaluated(i), c.intermediate_size) for i in range(c.num_layers)]

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
            elif isinstance(module, SelfAttention):
                module.pack_inference_weights()

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
        return [cast(torch.Tensor, f.last_leaves) for f in fffs]

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
        self.embeddings.reset_layout_parameters()


def _inside_fff(model: nn.Module, linear: nn.Linear) -> bool:
    return any(linear is f.linear_in or linear is f.linear_out for f in model.modules() if isinstance(f, FFF))
