"""The dense float32 linear kernel (torch.ops.ufb.linear, engine.linear) against F.linear on the shapes that break
kernels (no rows, one row, K and N off every vector width), on every instruction-set path this CPU has; a row's
result bit-identical alone and in any batch at any thread count; argument errors; which calls it takes and which go
to F.linear (gradients, autocast, other dtypes, int8 modules); and the models' forward through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmm_support import isa, on_one_thread  # noqa: F401  (isa is a fixture)
from tiny_models import random_batch, tiny_model
from torch import nn

from engine import cmm as C
from engine import linear as dense
from engine.precision import quantize_int8

pytestmark = pytest.mark.skipif(not dense.available(), reason=f"linear kernel not built: {C.KERNEL.error}")

OP = torch.ops.ufb.linear.default
# Elementwise bound on |kernel - F.linear| relative to sum_k |x_k w_k| + |b|: two float32 dot products in different
# orders differ by at most about 2 K u of that sum (u = 2^-24); 1e-5 covers K = 385 with room, and random errors sit
# far below it (sqrt(K) u).
REL_TOL = 1e-5


def problem(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)


def assert_matches_f_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = x.abs() @ w.abs().T + (0 if b is None else b.abs())
    excess = ((y - ref).abs() - REL_TOL * scale).max().item() if y.numel() else 0.0
    assert excess <= 0, f"error exceeds {REL_TOL} of sum |x w| + |b| by {excess:.3g}"


@pytest.mark.parametrize("m", [0, 1, 2, 3, 7, 8, 9, 31, 33, 100])
def test_matches_f_linear(m: int, isa: str) -> None:
    for k in (1, 7, 384, 385):
        for n in (1, 5, 384, 1152, 1153):
            x, w, b = problem(m, k, n, seed=m * 10_000 + k * 10 + n)
            for bias in (b, None):
                y = OP(x, w, bias)
                assert_matches_f_linear(y, x, w, bias)
                assert torch.equal(dense.linear(x, w, bias), y)  # the eager binding is the same computation


def test_zero_width_and_zero_rows() -> None:
    w, b = torch.randn(5, 0), torch.randn(5)
    assert torch.equal(OP(torch.randn(3, 0), w, b), b.expand(3, 5))
    assert torch.equal(OP(torch.randn(3, 0), w, None), torch.zeros(3, 5))
    assert OP(torch.randn(0, 8), torch.randn(5, 8), b).shape == (0, 5)
    assert dense.linear(torch.randn(2, 0, 8), torch.randn(5, 8), b).shape == (2, 0, 5)


@pytest.mark.parametrize("k,n", [(384, 1152), (385, 1153), (1536, 384), (7, 5)])
def test_a_row_is_bit_identical_alone_and_in_any_batch(k: int, n: int, isa: str) -> None:
    """No summation order depends on M, on the row's place in the tiles or on the thread split."""
    x, w, b = problem(100, k, n, seed=k + n)
    batch = on_one_thread(lambda: OP(x, w, b))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(OP(x, w, b), batch)  # columns split over two threads
    finally:
        torch.set_num_threads(threads)
    for i in (0, 1, 2, 50, 98, 99):
        assert torch.equal(OP(x[i : i + 1], w, b), batch[i : i + 1]), f"row {i} differs alone"
    for size in (2, 3, 4, 5, 7, 8, 31):
        assert torch.equal(OP(x[17 : 17 + size], w, b), batch[17 : 17 + size]), f"rows in a batch of {size} differ"
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(OP(x[order], w, b), batch[order])


def test_strided_x() -> None:
    x, w, b = problem(33, 385, 40, seed=3)
    wide = torch.randn(33, 500)
    wide[:, 10:395] = x
    rows = wide[:, 10:395]  # rows strided, columns adjacent: read in place
    assert torch.equal(OP(rows, w, b), OP(x, w, b))
    cols = torch.randn(33, 770)[:, ::2]  # columns strided: copied first
    assert torch.equal(OP(cols, w, b), OP(cols.contiguous(), w, b))
    transposed = x.T.contiguous().T
    assert torch.equal(OP(transposed, w, b), OP(x, w, b))
    three_d = torch.randn(4, 9, 385).transpose(0, 1)  # not viewable as [36, 385]: reshaped with a copy
    assert torch.equal(dense.linear(three_d, w, b), OP(three_d.reshape(36, 385), w, b).view(9, 4, 40))


def test_bad_arguments_raise_clear_errors() -> None:
    x, w, b = problem(3, 8, 5, seed=4)
    with pytest.raises(RuntimeError, match="float32"):
        OP(x.double(), w.double(), None)
    with pytest.raises(RuntimeError, match="float32"):
        OP(x, w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="x has width 8, weight expects 9"):
        OP(x, torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        OP(x.unsqueeze(0), w, None)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\]"):
        OP(x, w.unsqueeze(0), None)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        OP(x, torch.randn(8, 5).T, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[5\]"):
        OP(x, w, torch.randn(6))
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        OP(x, w, b.double())
    # engine.linear leaves anything the kernel does not take to F.linear, which raises its own errors.
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        dense.linear(x, torch.randn(5, 9), None)


def test_what_goes_to_f_linear() -> None:
    """The kernel takes float32 CPU calls with nothing to record for autograd and no autocast; the rest keeps
    F.linear's behaviour (gradients, bfloat16 outputs, other dtypes), and int8's quantized modules run as they are."""
    x, w, b = problem(7, 24, 10, seed=5)
    kernel = OP(x, w, b)
    assert torch.equal(dense.linear(x, w, b), kernel)
    with torch.inference_mode():
        assert torch.equal(dense.linear(x, w, b), kernel)
    w_param = nn.Parameter(w.clone())
    with torch.no_grad():
        assert torch.equal(dense.linear(x, w_param, b), kernel)
    y = dense.linear(x, w_param, b)  # training: autograd records F.linear
    assert y.grad_fn is not None
    y.sum().backward()
    assert w_param.grad is not None and torch.allclose(w_param.grad, x.sum(0).expand(10, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense.linear(x, w, b).dtype == torch.bfloat16
    assert dense.linear(x.double(), w.double(), b.double()).dtype == torch.float64
    assert torch.equal(dense.linear(x[0], w, b), kernel[0])  # one-dimensional x, as F.linear allows
    assert torch.equal(dense.linear(x.view(7, 1, 24), w, b), kernel.view(7, 1, 10))

    module = nn.Linear(24, 10)
    with torch.no_grad():
        assert torch.equal(dense.apply(module, x), OP(x, module.weight, module.bias))
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(module), {nn.Linear}, dtype=torch.qint8)[0]
    assert torch.equal(dense.apply(quantized, x), quantized(x))

    dense.use_kernel(False)
    try:
        assert torch.equal(dense.linear(x, w, b), F.linear(x, w, b))
    finally:
        dense.use_kernel(True)


def test_row_limit_sends_bigger_calls_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = problem(9, 24, 10, seed=6)
    monkeypatch.setattr(dense, "KERNEL_MAX_ROWS", 8)
    assert torch.equal(dense.linear(x[:8], w, b), OP(x[:8], w, b))
    assert torch.equal(dense.linear(x, w, b), F.linear(x, w, b))


def test_op_registration() -> None:
    """Schema, fake (meta) implementation and dispatch as torch.library checks them, so torch.compile can trace the
    op (the whole model's compile: tests/test_model_inference.py)."""
    x, w, b = problem(5, 16, 12, seed=7)
    torch.library.opcheck(OP, (x, w, b))
    torch.library.opcheck(OP, (x, w, None))


@pytest.mark.parametrize("layout", ["bert", "crammed"])
@pytest.mark.parametrize("ffn", ["fff", "dense"])
def test_model_forward_through_the_kernel(layout: str, ffn: str) -> None:
    """The models' inference projections (q/k/v, output, a dense feedforward) go through the kernel: the forward
    matches the F.linear forward to float32 rounding, and a sequence's token states alone and batched with others
    agree to the bound tests/test_model.py holds the padded path to (attention over padded groups need not be
    bit-identical; the projections are, test above)."""
    model = tiny_model(layout, ffn=ffn).eval()
    model.pack_inference_weights()
    lengths = [9, 4, 1, 6]
    ids, mask = random_batch(lengths)
    seqs = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    calls = []
    original = dense._EAGER

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args)

    with torch.inference_mode():
        dense._EAGER = counting
        try:
            with_kernel = model(ids, mask)
        finally:
            dense._EAGER = original
        dense.use_kernel(False)
        try:
            without = model(ids, mask)
        finally:
            dense.use_kernel(True)
        per_layer = 2 + (2 if ffn == "dense" else 0)  # q/k/v, out, and the dense FFN's two linears
        assert len(calls) == per_layer * len(model.layers)
        torch.testing.assert_close(with_kernel, without, atol=1e-5, rtol=0)
        batched = model.token_states_ids(seqs)
        for seq, states in zip(seqs, batched, strict=True):
            torch.testing.assert_close(model.token_states_ids([seq])[0], states, atol=1e-5, rtol=1e-5)


def test_int8_and_bfloat16_models_still_run() -> None:
    model = tiny_model("bert", ffn="dense").eval()
    ids, mask = random_batch([5, 3])
    with torch.inference_mode():
        reference = model(ids, mask)
        int8 = quantize_int8(model)(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids, mask)
    assert int8.dtype == torch.float32 and (int8 - reference).abs().max().item() < 0.2
    assert (bf16.float() - reference).abs().max().item() < 0.2
