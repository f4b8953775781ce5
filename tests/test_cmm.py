"""The compiled CMM kernel against the plain-PyTorch reference on the shapes that break kernels: float32,
bfloat16 and float16 weights.

Most cases use *dyadic* data (small multiples of powers of two) for x, w_in and b_in: every product and
every partial sum is then exactly representable in float32, so pre-activations are exact whatever order the
kernel sums in. Routing is therefore identical in kernel and reference (leaves compare exactly, ties at
exactly zero included: dyadic data produces many of them), and the outputs differ only by the rounding of
the GELU-weighted sums. Random-float cases run too, with fixed seeds (the kernel is deterministic).
"""

from __future__ import annotations

import pytest
import torch
from cmm_support import (
    BF16_REL_BOUND,
    FP16_REL_BOUND,
    FP32_TOL,
    check_against_reference,
    half,
    isa,  # noqa: F401  (a fixture)
    make_problem,
)

from engine import cmm as C

pytestmark = pytest.mark.skipif(not C.KERNEL.compiled, reason=f"CMM kernel not built: {C.KERNEL.error}")


@pytest.mark.parametrize("n", [0, 1, 7, 128, 1031])
@pytest.mark.parametrize("depth", [0, 1, 5, 11])
@pytest.mark.parametrize("trees", [1, 4])
def test_tokens_depths_trees(n: int, depth: int, trees: int, isa: str) -> None:
    if depth == 11 and trees == 4 and n > 128:
        n = 300  # keeps the reference's gathers small; the kernel path is the same
    check_against_reference(*make_problem(n, 384, 384, depth, trees, seed=n + 17 * depth + trees), depth)


@pytest.mark.parametrize("d_in,d_out", [(64, 64), (768, 768), (65, 33), (1, 7), (97, 768), (768, 100)])
@pytest.mark.parametrize("n", [1, 7, 200])
def test_widths(d_in: int, d_out: int, n: int, isa: str) -> None:
    check_against_reference(*make_problem(n, d_in, d_out, 5, 2, seed=d_in * 31 + d_out + n), 5)


@pytest.mark.parametrize("n", [1, 64, 1000])
def test_random_float_data(n: int, isa: str) -> None:
    check_against_reference(*make_problem(n, 768, 768, 11, 1, seed=n, exact=False), 11)


def test_exact_zero_preactivation_goes_left(isa: str) -> None:
    depth, d = 3, 16
    nodes = C.n_nodes(depth)
    x = torch.zeros(3, d)
    x[1, 0] = 1.0  # orthogonal to every w_in row below: pre-activation = bias = 0 exactly
    x[2, 0] = -0.0
    w_in = torch.zeros(1, nodes, d)
    w_in[0, :, 1] = 1.0
    b_in = torch.zeros(1, nodes)
    w_out = torch.randn(1, nodes, d)
    y, leaves = check_against_reference(x, w_in, b_in, w_out, depth)
    assert leaves.flatten().tolist() == [0, 0, 0]  # always left
    assert y.abs().max().item() == 0.0  # GELU(0) = 0
    # The smallest positive bias sends the root's decision right, and only the root's.
    b_in[0, 0] = torch.finfo(torch.float32).tiny
    _, leaves = check_against_reference(x, w_in, b_in, w_out, depth)
    assert leaves.flatten().tolist() == [4, 4, 4]


def test_dyadic_data_really_has_ties() -> None:
    """Guards the premise of the exact tests: ties at zero must occur, or they test nothing about ties."""
    x, w_in, b_in, _ = make_problem(512, 64, 8, 0, 1)
    pre = x @ w_in[0, 0] + b_in[0, 0]
    assert (pre == 0).sum().item() > 0


def test_non_contiguous_inputs(isa: str) -> None:
    x, w_in, b_in, w_out = make_problem(130, 96, 40, 5, 2, seed=3)
    wide = torch.zeros(130, 200)
    wide[:, 7:103] = x
    check_against_reference(wide[:, 7:103], w_in, b_in, w_out, 5)  # strided rows
    check_against_reference(x.t().contiguous().t(), w_in, b_in, w_out, 5)  # column-major
    check_against_reference(x[::2], w_in, b_in, w_out, 5)  # every other row


@pytest.mark.parametrize("n,depth,trees", [(1, 11, 1), (200, 5, 4), (1000, 11, 1), (33, 0, 1)])
def test_bf16_weights_equal_reference_on_same_weights(n: int, depth: int, trees: int, isa: str) -> None:
    x, w_in, b_in, w_out = make_problem(n, 768, 768, depth, trees, seed=5)
    # Dyadic w_in (multiples of 1/16) is exact in bf16, so routing is exact; w_out gets rounded.
    check_against_reference(x, w_in.bfloat16(), b_in, w_out.bfloat16(), depth)


def test_bf16_bound_against_float32_weights() -> None:
    x, w_in, b_in, w_out = make_problem(2000, 768, 768, 11, 1, seed=9, exact=False)
    y32, leaves32 = C.cmm(x, w_in, b_in, w_out, 11, return_leaves=True)
    y16, leaves16 = C.cmm(x, w_in.bfloat16(), b_in, w_out.bfloat16(), 11, return_leaves=True)
    same = (leaves32 == leaves16).all(dim=1)
    assert same.float().mean().item() > 0.9
    rel = (y16[same] - y32[same]).abs().max().item() / y32.abs().max().item()
    assert rel <= BF16_REL_BOUND, rel


# ---------------------------------------------------------------------------------------------------- float16


@pytest.mark.parametrize("n", [0, 1, 7, 128, 1031])
@pytest.mark.parametrize("depth", [0, 1, 5, 11])
@pytest.mark.parametrize("trees", [1, 4])
def test_fp16_tokens_depths_trees(n: int, depth: int, trees: int, isa: str) -> None:
    if depth == 11 and trees == 4 and n > 128:
        n = 300
    # Dyadic w_in (multiples of 1/16) is exact in float16, so routing is exact; w_out gets rounded.
    check_against_reference(*half(*make_problem(n, 384, 384, depth, trees, seed=n + 17 * depth + trees)), depth)


@pytest.mark.parametrize("d_in,d_out", [(64, 64), (768, 768), (65, 33), (1, 7), (97, 768), (768, 100)])
@pytest.mark.parametrize("n", [1, 7, 200])
def test_fp16_widths(d_in: int, d_out: int, n: int, isa: str) -> None:
    check_against_reference(*half(*make_problem(n, d_in, d_out, 5, 2, seed=d_in * 31 + d_out + n)), 5)


@pytest.mark.parametrize("n", [1, 64, 1000])
def test_fp16_random_float_data(n: int, isa: str) -> None:
    check_against_reference(*half(*make_problem(n, 768, 768, 11, 1, seed=n, exact=False)), 11)


def test_fp16_non_contiguous_inputs(isa: str) -> None:
    x, w_in, b_in, w_out = half(*make_problem(130, 96, 40, 5, 2, seed=3))
    wide = torch.zeros(130, 200)
    wide[:, 7:103] = x
    check_against_reference(wide[:, 7:103], w_in, b_in, w_out, 5)
    check_against_reference(x.t().contiguous().t(), w_in, b_in, w_out, 5)
    check_against_reference(x[::2], w_in, b_in, w_out, 5)


def test_fp16_exact_zero_preactivation_goes_left(isa: str) -> None:
    depth, d = 3, 16
    nodes = C.n_nodes(depth)
    x = torch.zeros(3, d)
    x[1, 0] = 1.0
    x[2, 0] = -0.0
    w_in = torch.zeros(1, nodes, d, dtype=torch.float16)
    w_in[0, :, 1] = 1.0
    w_in[0, :, 0] = -0.0  # x[2, 0] * -0.0: signed zeros in the weights too
    b_in = torch.zeros(1, nodes)
    w_out = torch.randn(1, nodes, d).half()
    y, leaves = check_against_reference(x, w_in, b_in, w_out, depth)
    assert leaves.flatten().tolist() == [0, 0, 0]
    assert y.abs().max().item() == 0.0
    b_in[0, 0] = torch.finfo(torch.float32).tiny
    _, leaves = check_against_reference(x, w_in, b_in, w_out, depth)
    assert leaves.flatten().tolist() == [4, 4, 4]


def test_fp16_conversion_of_every_finite_value(isa: str) -> None:
    """All 63,488 finite float16 values (subnormals, signed zeros, extremes) go through one w_out row: the kernel
    must widen each exactly. y = GELU(a) * w, one rounding, so y == y[0] * w bit for bit with w[0] = 1. (The sign of
    a zero cannot be seen: the kernel's sums start from +0.)"""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    values = values[torch.isfinite(values)]
    w = torch.cat([torch.ones(1, dtype=torch.float16), values])
    x = torch.ones(1, 8)
    w_in = torch.full((1, 1, 8), 0.25, dtype=torch.float16)  # a = 2: GELU(a) is not a power of two
    b_in = torch.zeros(1, 1)
    y, _ = C.cmm(x, w_in, b_in, w.view(1, 1, -1), 0)
    assert torch.equal(y[0, 1:], y[0, 0] * values.float())


def test_fp16_bound_against_float32_weights() -> None:
    x, w_in, b_in, w_out = make_problem(2000, 768, 768, 11, 1, seed=9, exact=False)
    y32, leaves32 = C.cmm(x, w_in, b_in, w_out, 11, return_leaves=True)
    rel = {}
    for dtype in (torch.float16, torch.bfloat16):
        y16, leaves16 = C.cmm(x, w_in.to(dtype), b_in, w_out.to(dtype), 11, return_leaves=True)
        same = (leaves32 == leaves16).all(dim=1)
        assert same.float().mean().item() > (0.99 if dtype == torch.float16 else 0.9)
        rel[dtype] = (y16[same] - y32[same]).abs().max().item() / y32.abs().max().item()
    assert rel[torch.float16] <= FP16_REL_BOUND, rel
    assert rel[torch.float16] < rel[torch.bfloat16] / 4, rel  # 3 more mantissa bits: ~8x smaller


@pytest.mark.parametrize("bad", [65520.0, -1e6, float("inf"), float("-inf")])
def test_pack_fp16_refuses_weights_outside_its_range(bad: float) -> None:
    trees, depth, d = 1, 2, 8
    nodes = C.n_nodes(depth)
    lin_in_w, lin_in_b, lin_out_w = torch.randn(nodes, d), torch.randn(nodes), torch.randn(d, nodes)
    for weight, name in ((lin_in_w, "linear_in.weight"), (lin_out_w, "linear_out.weight")):
        saved = weight[1, 2].item()
        weight[1, 2] = bad
        with pytest.raises(ValueError, match=f"{name}.*float16 range"):
            C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees, torch.float16)
        C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees, torch.bfloat16)  # other dtypes unaffected
        weight[1, 2] = saved
    lin_in_w[0, 0], lin_out_w[0, 0] = 65504.0, -65504.0  # the largest float16 itself is fine
    w_in, b_in, w_out = C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees, torch.float16)
    assert w_in.dtype == w_out.dtype == torch.float16 and b_in.dtype == torch.float32
    assert torch.isfinite(w_in).all() and torch.isfinite(w_out).all()


def test_fff_module_fp16_weights() -> None:
    from engine.fff import FFF

    torch.manual_seed(4)
    fff = FFF(64, 48, 5, 2).eval()
    x = torch.randn(37, 64)
    with torch.inference_mode():
        y32 = fff(x)
    fff.weight_dtype = torch.float16
    with torch.inference_mode():
        y16 = fff(x)
        w_in, b_in, w_out = fff.packed_weights()
        y_ref, _ = C.cmm_reference(x, w_in, b_in, w_out, 5)
    assert w_in.dtype == w_out.dtype == torch.float16 and y16.dtype == torch.float32
    torch.testing.assert_close(y16, y_ref, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(y16, y32, atol=1e-2, rtol=1e-2)
    # Choosing float16 for weights it cannot hold fails at once (model load), and leaves the dtype as it was.
    fff.weight_dtype = torch.float32
    with torch.no_grad():
        fff.linear_out.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="float16 range"):
        fff.weight_dtype = torch.float16
    assert fff.weight_dtype == torch.float32
