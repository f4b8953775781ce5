"""Self-attention over packed sequences (the serving path): the compiled kernel where it applies, torch's
``scaled_dot_product_attention`` per length group everywhere else.

The kernel (``torch.ops.ufb.varlen_attention``, csrc/cpu/attention_cpu.cpp) takes the fused projection's ``[N, 3H]``
rows and every sequence's start and length, and computes all of them in one call, without padding, masks or a call
per distinct length; it applies to float32 CPU tensors with nothing for autograd to record and no CPU autocast
(serving; training and bfloat16 take SDPA). Each (sequence, head) is computed alone, so a sequence's result is
bit-identical alone and in any batch, at any thread count. docs/kernel.md has why and the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cmm as cmm_ops
from engine.packing import Packing

_ext = cmm_ops.extension()
# The kernel without the dispatcher (csrc/python/fast_path.cpp): returns NotImplemented where SDPA must run.
_EAGER = getattr(_ext, "attention_eager", None)
_OP = torch.ops.ufb.varlen_attention.default if _EAGER is not None else None
_enabled = _EAGER is not None


def available() -> bool:
    """Whether the compiled kernel is built into this process."""
    return _EAGER is not None


def use_kernel(on: bool) -> None:
    """Route eligible calls through the kernel (the default where it is built) or always through SDPA (the
    benchmark's before/after comparison, tests)."""
    global _enabled
    if on and _EAGER is None:
        raise RuntimeError(f"the attention kernel is not built: {cmm_ops.KERNEL.error}")
    _enabled = on


def packed(qkv: torch.Tensor, packing: Packing, num_heads: int) -> torch.Tensor:
    """``[N, 3, heads, head_dim]`` q/k/v of packed tokens -> ``[N, heads * head_dim]`` attention output, each
    sequence attending to itself only (scale ``1 / sqrt(head_dim)``)."""
    n = qkv.shape[0]
    if _enabled and _EAGER is not None:
        flat = qkv.reshape(n, -1)
        if not cmm_ops.is_compiling():
            y = _EAGER(flat, packing.starts, packing.lengths, num_heads)
            if y is not NotImplemented:
                return y
        elif _OP is not None and _traced_applies(flat):
            return _OP(flat, packing.starts, packing.lengths, num_heads)
    return by_length_group(qkv, packing)


def by_length_group(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The same with torch's SDPA, one call per group of :attr:`Packing.groups` (padded within a group)."""
    _, _, heads, head_dim = qkv.shape
    parts = []
    for g in packing.groups:
        rows = qkv[g.start : g.end]
        block = rows if g.gather is None else rows.index_select(0, g.gather)
        q, k, v = block.view(g.n, g.t, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
        context = context.transpose(1, 2).reshape(g.n * g.t, -1)
        parts.append(context if g.scatter is None else context.index_select(0, g.scatter))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _traced_applies(qkv: torch.Tensor) -> bool:
    """The fast path's test (csrc/cpu/attention_op.cpp ``varlen_attention_applies``) for code torch.compile traces."""
    return (
        qkv.dtype == torch.float32
        and qkv.device.type == "cpu"
        and not (torch.is_grad_enabled() and qkv.requires_grad)
        and not torch.is_autocast_enabled("cpu")
    )
