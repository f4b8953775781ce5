"""Conditional matrix multiplication (CMM): the inference-time operation of a fast feedforward layer.

A token descends each of K balanced binary trees of depth D (heap order, node 0 at the root). At node i it
computes the pre-activation ``a = w_in[i] . x + b_in[i]``, adds ``GELU(a) * w_out[i]`` to its output and moves
to child ``2i + 1`` when ``a <= 0`` (ties at exactly zero go left, as in the reference) or ``2i + 2`` when
``a > 0``. Only ``K * (D + 1)`` of the ``K * (2^(D+1) - 1)`` neurons are ever touched.

Two implementations live behind one function, :func:`cmm`:

* the compiled kernel (``csrc/``), registered as the custom op ``torch.ops.ufb.cmm`` so that it runs under
  ``torch.inference_mode()`` and ``torch.compile`` can trace it (eager calls reach the same C++ function
  through a direct binding, which skips the dispatcher's per-call cost);
* :func:`cmm_reference`, a plain-PyTorch gather implementation. It is what the tests compare the kernel with,
  and the documented fallback where the extension could not be built; :data:`KERNEL` says which one runs,
  so the service can report it loudly.

Weight layout (packed once at load time, see :func:`pack_fff_weights`): ``w_in [K, n_nodes, d_in]``,
``b_in [K, n_nodes]`` (float32), ``w_out [K, n_nodes, d_out]`` (the transpose of ``linear_out.weight``, so each
node's output row is contiguous). ``w_in`` and ``w_out`` are float32, bfloat16 or float16 (both the same);
activations, biases and outputs are float32. The kernel widens 16-bit weights to float32 as it loads them, so the
only difference between the dtypes is the rounding of the weights: bfloat16 keeps 8 significant bits, float16
keeps 11 (relative error <= 2^-11 for |w| >= 2^-14; below that, absolute error <= 2^-25) but cannot hold
|w| > 65504, which :func:`pack_fff_weights` refuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def n_nodes(depth: int) -> int:
    """Nodes in one balanced tree of the given depth (depth 0 is a single neuron)."""
    return 2 ** (depth + 1) - 1


@dataclass(frozen=True)
class KernelInfo:
    """Which CMM implementation runs in this process, and why."""

    compiled: bool
    name: str  # e.g. "compiled:avx2-fma" or "reference"
    error: str | None = None  # why the compiled kernel is not in use

    def describe(self) -> str:
        if self.compiled:
            return f"compiled CMM kernel ({self.name})"
        return f"PLAIN-PYTORCH REFERENCE CMM (slow fallback): {self.error}"


def _load_kernel() -> KernelInfo:
    try:
        from engine import _cmm  # noqa: F401  (importing registers torch.ops.ufb.*)
    except Exception as exc:  # ImportError, or an OSError from a mismatched torch ABI
        return KernelInfo(
            False,
            "reference",
            f"the compiled extension engine._cmm failed to load ({exc!r}); "
            "build it with `pip install --no-build-isolation -e .`",
        )
    _register_fake()
    return KernelInfo(True, f"compiled:{_cmm.cpu_path()}")


def _register_fake() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can see through the ops (``ufb::cmm``,
    ``ufb::linear``, engine.linear's kernel, and ``ufb::varlen_attention``, engine.attention's)."""

    @torch.library.register_fake("ufb::cmm")
    def _(x, w_in, b_in, w_out, depth, return_leaves, b_out=None):
        n = x.shape[0]
        y = x.new_empty((n, w_out.shape[2]), dtype=torch.float32)
        leaves = x.new_empty((n, w_in.shape[0]) if return_leaves else (0, w_in.shape[0]), dtype=torch.int64)
        return y, leaves

    @torch.library.register_fake("ufb::linear")
    def _(x, weight, bias=None):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("ufb::varlen_attention")
    def _(qkv, starts, lengths, num_heads):
        return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3), dtype=torch.float32)


KERNEL: KernelInfo = _load_kernel()
# Resolved once: looking the op up through torch.ops on every call costs about a microsecond, which is a
# noticeable share of a one-token FFF call.
_OP = torch.ops.ufb.cmm.default if KERNEL.compiled else None
# The same computation bound directly, as a bare CPython function: eager calls skip the dispatcher's argument
# matching, which costs as much as the kernel on one token (docs/kernel.md). torch.compile keeps the op.
_EAGER = None
if KERNEL.compiled:
    from engine import _cmm as _ext

    _EAGER = _ext.cmm_eager


# Bound once, off the per-call path; dynamo recognises the function itself, so traced code still sees True and
# takes the op.
is_compiling = torch.compiler.is_compiling


def extension() -> ModuleType | None:
    """The compiled module ``engine._cmm`` (its other helpers, e.g. ``tensor_stamp``), or None where it did not
    load."""
    return _ext if KERNEL.compiled else None


def _check(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, depth: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d_in], got shape {tuple(x.shape)}")
    if w_in.dim() != 3 or w_out.dim() != 3 or b_in.dim() != 2:
        raise ValueError("expected w_in [K, n_nodes, d_in], b_in [K, n_nodes], w_out [K, n_nodes, d_out]")
    k, nodes, d_in = w_in.shape
    if nodes != n_nodes(depth):
        raise ValueError(f"depth {depth} needs {n_nodes(depth)} nodes per tree, weights have {nodes}")
    if x.shape[1] != d_in:
        raise ValueError(f"x has width {x.shape[1]}, w_in expects {d_in}")
    if tuple(b_in.shape) != (k, nodes) or w_out.shape[:2] != (k, nodes):
        raise ValueError("b_in / w_out do not match w_in's trees and nodes")


def cmm(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    depth: int,
    return_leaves: bool = False,
    b_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y [N, d_out]`` float32 (plus the output bias ``b_out [d_out]``, if given) and, if asked, the leaf
    (0 .. 2^depth - 1) each token reached in each tree."""
    if _EAGER is not None and x.is_cpu:
        if not is_compiling():
            return _EAGER(x, w_in, b_in, w_out, depth, return_leaves, b_out)  # already (y, leaves or None)
        if _OP is None:  # bound with _EAGER: both or neither
            raise RuntimeError("engine._cmm loaded but torch.ops.ufb.cmm is not bound")
        y, leaves = _OP(x, w_in, b_in, w_out, depth, return_leaves, b_out)
        return y, (leaves if return_leaves else None)
    y, leaves = cmm_reference(x, w_in, b_in, w_out, depth, b_out)
    return y, (leaves if return_leaves else None)


def cmm_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    depth: int,
    b_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch CMM: one gather of the visited rows per level, all tokens and trees at once."""
    _check(x, w_in, b_in, w_out, depth)
    if b_out is not None and tuple(b_out.shape) != (w_out.shape[2],):
        raise ValueError(f"b_out must be [d_out] = [{w_out.shape[2]}], got shape {tuple(b_out.shape)}")
    x = x.float()
    w_in = w_in.float()
    w_out = w_out.float()
    n, k = x.shape[0], w_in.shape[0]
    trees = torch.arange(k, device=x.device).expand(n, k)
    node = torch.zeros((n, k), dtype=torch.long, device=x.device)
    y = x.new_zeros((n, w_out.shape[2]))
    for _ in range(depth + 1):
        a = torch.einsum("nkd,nd->nk", w_in[trees, node], x) + b_in.float()[trees, node]
        y += torch.einsum("nk,nkd->nd", F.gelu(a), w_out[trees, node])
        node = 2 * node + 1 + (a > 0).long()
    if b_out is not None:
        y += b_out.float()
    first_leaf = n_nodes(depth)  # after the last level `node` points one level below the leaves
    leaves = (node - 1) // 2 - (first_leaf - 2**depth)
    return y, leaves


def pack_fff_weights(
    linear_in_weight: torch.Tensor,
    linear_in_bias: torch.Tensor,
    linear_out_weight: torch.Tensor,
    trees: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-layout FFF parameters -> the kernel's layout (done once, at load time).

    ``linear_in.weight [K * n_nodes, d_in]``, ``linear_in.bias [K * n_nodes]``,
    ``linear_out.weight [d_out, K * n_nodes]`` -> ``w_in [K, n, d_in]``, ``b_in [K, n]``, ``w_out [K, n, d_out]``.

    float16 raises :class:`ValueError` if a weight's magnitude exceeds 65504 (the largest float16), rather than
    silently turning it into an infinity.
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype}")
    if dtype == torch.float16:
        check_fits_float16(linear_in_weight, "linear_in.weight")
        check_fits_float16(linear_out_weight, "linear_out.weight")
    total, d_in = linear_in_weight.shape
    nodes = total // trees
    w_in = linear_in_weight.detach().reshape(trees, nodes, d_in).to(dtype).contiguous()
    b_in = linear_in_bias.detach().reshape(trees, nodes).float().contiguous()
    w_out = linear_out_weight.detach().t().reshape(trees, nodes, -1).to(dtype).contiguous()
    return w_in, b_in, w_out


def check_fits_float16(weight: torch.Tensor, name: str) -> None:
    """Refuses weights that float16 would turn into +-inf (|w| > 65504; infinities included)."""
    limit = torch.finfo(torch.float16).max
    magnitude = weight.detach().abs()
    too_big = magnitude > limit  # NaN compares False: NaNs pass through, as with the other dtypes
    if too_big.any():
        worst = magnitude[too_big].max().item()
        raise ValueError(
            f"{name} has a weight of magnitude {worst:g}, outside the float16 range (|w| <= {limit:g}); "
            "use weight dtype float32 or bfloat16 for this model"
        )
