"""The fast feedforward (FFF) layer: K balanced binary trees of single neurons, hard routing.

Parameter names and shapes follow the reference implementation (``linear_in [K * n_nodes, d_in]`` with bias,
``linear_out [d_out, K * n_nodes]`` without bias) so that published crammedBERT-FFF checkpoints load as they are.
Tree ``k`` owns rows ``k * n_nodes ... (k + 1) * n_nodes - 1`` in heap order.

Three implementations compute the same function:

* ``"masked"``: all node pre-activations densely, then a mask of the visited nodes. It is the only one that is
  differentiable, so training (``module.training`` with grad enabled) always uses it; gradients reach visited
  neurons only, and the routing decisions get none. With ``routing_tau > 0`` (training only) the forward pass is
  unchanged but the mask's gradient is that of soft routing (each node reached with the product of
  ``sigmoid(+-a / (tau * spread))`` along its path, ``spread`` = each node's pre-activation spread in the batch):
  a straight-through estimator, so a split can move towards where it lowers the loss.
* ``"kernel"``: :func:`engine.cmm.cmm` (the compiled CMM kernel, or its plain-PyTorch fallback) on weights packed
  once and cached. The serving path; in eval mode on a float32 ``[N, d_in]`` batch the whole forward is one call
  into the extension (``fff_forward``), which checks the packed weights are current and runs the kernel.
* ``"reference"``: :func:`engine.cmm.cmm_reference` on the same packed weights, for tests and benchmarks.

An optional output bias exists only for the BERT layout (``bias_out=True``): converted students keep their teacher
FFN's output bias, which the reference FFF lacks. The kernel adds it as it writes each output row, so it costs no
separate pass over the output (docs/kernel.md).
"""

from __future__ import annotations

import math
import threading
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import cmm as cmm_ops
from engine.derived import Derived

IMPLS = ("kernel", "reference", "masked")
# csrc/python/fast_path.cpp ``fff_forward``: :meth:`FFF.forward`'s serving case in one call (None without the extension)
_FFF_FORWARD = getattr(cmm_ops.extension(), "fff_forward", None)


class FFF(nn.Module):
    """Fast feedforward layer ``d_in -> d_out`` of ``trees`` trees of depth ``depth``."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        depth: int,
        trees: int = 1,
        *,
        bias_out: bool = False,
        impl: str = "kernel",
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.depth, self.trees = d_in, d_out, depth, trees
        self.n_nodes = cmm_ops.n_nodes(depth)
        self._packed: Derived[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = Derived()
        self.linear_in = nn.Linear(d_in, trees * self.n_nodes, bias=True)
        self.linear_out = nn.Linear(trees * self.n_nodes, d_out, bias=bias_out)
        self.reset_parameters()
        self.impl = impl
        self.weight_dtype = weight_dtype
        self.record_leaves = False
        self.routing_tau = 0.0  # > 0: straight-through soft-routing gradient in training (module docstring)
        # per calling thread: several inference workers may run one model at once (a dict, unlike threading.local,
        # survives copy.deepcopy)
        self._leaves: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ configuration

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"FFF impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._weight_dtype

    @weight_dtype.setter
    def weight_dtype(self, value: torch.dtype) -> None:
        if value not in cmm_ops.WEIGHT_DTYPES:
            raise ValueError(f"FFF weight dtype must be one of {cmm_ops.WEIGHT_DTYPES}, got {value}")
        if value == torch.float16:  # fail when the dtype is chosen (model load), not at the first request
            cmm_ops.check_fits_float16(self.linear_in.weight, "linear_in.weight")
            cmm_ops.check_fits_float16(self.linear_out.weight, "linear_out.weight")
        self._weight_dtype = value
        self.invalidate()

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, trees={self.trees}, "
            f"impl={self.impl!r}, weight_dtype={self.weight_dtype}"
        )

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The reference initialisation: inputs U(+-1/sqrt(d_in)), outputs U(+-1/sqrt(K * (D + 1))).

        The output scale accounts for the K * (D + 1) neurons a token actually sums, not for all nodes.
        """
        k_in = math.sqrt(1.0 / self.d_in)
        k_out = math.sqrt(1.0 / ((self.depth + 1) * self.trees))
        self.linear_in.weight.uniform_(-k_in, k_in, generator=generator)
        self.linear_in.bias.uniform_(-k_in, k_in, generator=generator)
        self.linear_out.weight.uniform_(-k_out, k_out, generator=generator)
        if self.linear_out.bias is not None:
            self.linear_out.bias.zero_()
        self.invalidate()

    # ------------------------------------------------------------------ packed weights

    def invalidate(self) -> None:
        """Drop the packed kernel weights; they are rebuilt on the next inference call."""
        self._packed.clear()

    def packed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kernel-layout weights ``(w_in, b_in, w_out)``, repacked only when a parameter changed (in place or
        replaced)."""
        return self._kernel_weights()[:3]

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The packed weights and the float32 output bias (None without one): every argument of the kernel call."""
        # The parameter dicts are read directly: nn.Module attribute lookup costs microseconds, which matters
        # when a whole FFF call on one token takes a few. Both linears always exist, and so do both weights and
        # linear_in's bias; only linear_out's bias may be None.
        modules = cast("dict[str, nn.Module]", self._modules)
        lin_in = modules["linear_in"]._parameters
        lin_out = modules["linear_out"]._parameters
        sources = cast("tuple[torch.Tensor, ...]", (lin_in["weight"], lin_in["bias"], lin_out["weight"]))
        bias = lin_out["bias"]
        return self._packed.get(sources if bias is None else (*sources, bias), self._pack, self._weight_dtype)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w_in, b_in, w_out = cmm_ops.pack_fff_weights(
            self.linear_in.weight, self.linear_in.bias, self.linear_out.weight, self.trees, self._weight_dtype
        )
        bias = self.linear_out.bias
        return w_in, b_in, w_out, None if bias is None else bias.detach().float().contiguous()

    # ------------------------------------------------------------------ recorded leaves

    @property
    def last_leaves(self) -> torch.Tensor | None:
        """``[N, K]`` leaves of this thread's latest forward while ``record_leaves`` was on."""
        return self._leaves.get(threading.get_ident())

    def clear_leaves(self) -> None:
        self._leaves.clear()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The serving call (kernel impl, eval mode, a float32 [N, d_in] CPU batch, packed weights still current) is
        # one call into the extension, which returns NotImplemented for anything else: on one token the same checks
        # in Python would cost about as much as the kernel (docs/kernel.md).
        if _FFF_FORWARD is not None and not cmm_ops.is_compiling():
            y = _FFF_FORWARD(self, x)
            if y is not NotImplemented:
                return y
        shape = x.shape
        if shape[-1] != self.d_in:
            raise ValueError(f"FFF expects inputs of width {self.d_in}, got shape {tuple(shape)}")
        flat = x if len(shape) == 2 else x.reshape(-1, self.d_in)
        leaves: torch.Tensor | None
        if self._impl == "masked" or (self.training and torch.is_grad_enabled()):
            y, leaves = self._forward_masked(flat)
        else:
            w_in, b_in, w_out, bias = self._kernel_weights()
            if flat.dtype != torch.float32:
                flat = flat.float()
            if self._impl == "reference":
                y, leaves = cmm_ops.cmm_reference(flat, w_in, b_in, w_out, self.depth, bias)
            else:
                y, leaves = cmm_ops.cmm(flat, w_in, b_in, w_out, self.depth, self.record_leaves, bias)
        if self.record_leaves:
            if leaves is None:  # every path returns them when record_leaves is on
                raise RuntimeError("the CMM kernel returned no leaves although record_leaves is on")
            self._leaves[threading.get_ident()] = leaves
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.d_out) if len(shape) != 2 else y

    def _forward_masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense pre-activations, hard routing mask; differentiable w.r.t. the visited neurons."""
        hidden, leaves = self.path_activations(x)
        return F.linear(hidden, self.linear_out.weight, self.linear_out.bias), leaves

    def path_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, K * n_nodes]`` GELU activations of the visited nodes (zero elsewhere), and the ``[N, K]`` leaves.

        The layer's output is ``linear_out`` of these, which is what lets ``engine.training.fff_fit`` solve for the
        output rows in closed form."""
        n = x.shape[0]
        logits = self.linear_in(x).view(n, self.trees, self.n_nodes)
        with torch.no_grad():
            right = logits > 0  # ties at exactly zero go left, as in the reference
            node = torch.zeros((n, self.trees), dtype=torch.long, device=x.device)
            mask = torch.zeros_like(logits)
            mask.scatter_(2, node.unsqueeze(2), 1.0)
            for _ in range(self.depth):
                go_right = torch.gather(right, 2, node.unsqueeze(2)).squeeze(2).long()
                node = 2 * node + 1 + go_right
                mask.scatter_(2, node.unsqueeze(2), 1.0)
            leaves = node - (self.n_nodes - 2**self.depth)
        if self.routing_tau > 0 and torch.is_grad_enabled() and logits.requires_grad:
            soft = self._soft_reach(logits)
            mask = mask + (soft - soft.detach())  # the hard mask's values, soft routing's gradient
        return (F.gelu(logits) * mask).flatten(1), leaves

    def _soft_reach(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, K, n_nodes]`` probability of reaching each node when every node sends a token right with
        ``sigmoid(a / (tau * spread))``; computed level by level (heap order keeps a level's nodes contiguous)."""
        n = logits.shape[0]
        spread = logits.detach().std(0, keepdim=True).clamp_min(1e-6) if n > 1 else torch.ones_like(logits[:1])
        right = torch.sigmoid(logits / (self.routing_tau * spread))
        levels = [logits.new_ones(n, self.trees, 1)]
        for level in range(self.depth):
            first = 2**level - 1
            p = right[:, :, first : 2 * first + 1]
            levels.append((levels[-1].unsqueeze(3) * torch.stack((1 - p, p), 3)).flatten(2))
        return torch.cat(levels, 2)
