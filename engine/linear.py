"""The dense linear of inference, ``y = x @ weight^T + bias``: the compiled float32 kernel where it applies, torch's
``F.linear`` everywhere else.

The kernel (``torch.ops.ufb.linear``, csrc/cpu/linear_cpu.cpp) takes float32 CPU tensors with nothing for autograd
to record and no CPU autocast active: the attention projections and a dense feedforward at serving time. Training
(tensors that need gradients), bfloat16 autocast, other dtypes and devices take ``F.linear``; int8's quantized
modules are called as they are (:func:`apply`).

Why a kernel of our own: at serving sizes (a few to a few hundred rows, K and N of a few hundred) torch's BLAS
reaches a fraction of a core's FMA peak on some CPUs (docs/kernel.md). The kernel computes every output as one dot
product over the whole of K in a fixed order, so a row's result is bit-identical alone and in any batch, at any
thread count. Above :data:`KERNEL_MAX_ROWS` rows, when set, calls go to ``F.linear``, and that promise then holds
only below it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import cmm as cmm_ops

# Rows (x's leading dimensions flattened) above which F.linear runs instead of the kernel; None: no limit.
KERNEL_MAX_ROWS: int | None = None

_ext = cmm_ops.extension()
# The kernel without the dispatcher (csrc/python/fast_path.cpp): returns NotImplemented where F.linear must run.
_EAGER = getattr(_ext, "linear_eager", None)
_OP = torch.ops.ufb.linear.default if _EAGER is not None else None
_enabled = _EAGER is not None


def available() -> bool:
    """Whether the compiled kernel is built into this process."""
    return _EAGER is not None


def use_kernel(on: bool) -> None:
    """Route eligible calls through the kernel (the default where it is built) or always through F.linear (the
    benchmark's before/after comparison, tests)."""
    global _enabled
    if on and _EAGER is None:
        raise RuntimeError(f"the linear kernel is not built: {cmm_ops.KERNEL.error}")
    _enabled = on


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] else 0


def _traced_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The fast path's test (csrc/cpu/linear_op.cpp ``linear_applies``) for code torch.compile traces."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.is_autocast_enabled("cpu")
        and x.dim() >= 1
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dim() == 1 and bias.is_contiguous() and bias.shape[0] == weight.shape[0]))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed by the kernel where it applies (see the module docstring)."""
    if _enabled and _EAGER is not None and (KERNEL_MAX_ROWS is None or _rows(x) <= KERNEL_MAX_ROWS):
        if not cmm_ops.is_compiling():
            y = _EAGER(x, weight, bias)
            if y is not NotImplemented:
                return y
        elif _OP is not None and _traced_applies(x, weight, bias):
            y = _OP(x.reshape(-1, x.shape[-1]), weight, bias)
            return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, with a plain ``nn.Linear`` computed by :func:`linear` (the same function; its forward hooks,
    which the serving path does not use, are skipped). Any other module (int8's quantized linears) is called."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)
