"""Packed batches (TEI's "unpadded" layout): a list of token id sequences as one ``[real tokens]`` vector, and
where each sequence lies in it. Projections, LayerNorms and the FFN then run once over real tokens only; only the
attention core needs ``[batch, heads, T, T]`` blocks, one per group of sequences of similar length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def pack(
    ids: Sequence[Sequence[int]], max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO
) -> tuple[torch.Tensor, Packing]:
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
        n, lens = len(g), lengths[seq : seq + len(g)]
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
    packing = Packing(
        order=torch.tensor(order),
        lengths=lengths_t,
        starts=torch.tensor(starts),
        positions=torch.cat([torch.arange(x) for x in lengths]),
        seq_index=torch.repeat_interleave(torch.arange(len(order)), lengths_t),
        groups=tuple(attention),
    )
    return torch.tensor(flat, dtype=torch.long), packing
