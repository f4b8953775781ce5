"""The CMM kernel's paths and entry points: every instruction set against the reference, the output bias, the
custom op, the eager binding and torch.compile, argument errors, the packed layout, the two-pass descent, GELU."""

from __future__ import annotations

import pytest
import torch
from cmm_support import (
    FP32_TOL,
    check_against_reference,
    isa,  # noqa: F401  (a fixture)
    make_problem,
    on_one_thread,
)

from engine import cmm as C

pytestmark = pytest.mark.skipif(not C.KERNEL.compiled, reason=f"CMM kernel not built: {C.KERNEL.error}")


def test_every_path_equals_reference(isa: str) -> None:
    check_against_reference(*make_problem(300, 97, 64, 5, 4, seed=11), 5)
    x, w_in, b_in, w_out = make_problem(50, 768, 768, 11, 1, seed=12)
    check_against_reference(x, w_in.bfloat16(), b_in, w_out.bfloat16(), 11)
    check_against_reference(*make_problem(1031, 768, 384, 11, 1, seed=13), 11)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, torch.float16])
def test_output_bias_is_added_as_rows_are_written(isa: str, weights: torch.dtype) -> None:
    """``b_out`` (BERT-layout FFFs keep their teacher FFN's output bias) starts each output row's sum in the
    kernel: the result equals the same call without it plus the bias, and the reference with it, for odd widths
    (vector tails), zero and one tokens, several trees, and a batch large enough for the two-pass descent."""
    for n, d_in, d_out, depth, trees in [
        (0, 16, 7, 2, 1),
        (1, 33, 7, 3, 1),
        (7, 64, 33, 5, 4),
        (300, 97, 100, 5, 2),
        (1031, 768, 768, 11, 1),
    ]:
        x, w_in, b_in, w_out = make_problem(n, d_in, d_out, depth, trees, seed=n + d_out)
        w_in, w_out = w_in.to(weights), w_out.to(weights)
        bias = torch.randn(d_out, generator=torch.Generator().manual_seed(n)) * 3
        y, leaves = C.cmm(x, w_in, b_in, w_out, depth, True, b_out=bias)
        y_plain, leaves_plain = C.cmm(x, w_in, b_in, w_out, depth, True)
        y_ref, _ = C.cmm_reference(x, w_in, b_in, w_out, depth, bias)
        assert y.shape == (n, d_out) and torch.equal(leaves, leaves_plain)
        torch.testing.assert_close(y, y_plain + bias, atol=FP32_TOL, rtol=0)
        torch.testing.assert_close(y, y_ref, atol=FP32_TOL, rtol=0)
        if n:
            assert (y - y_plain).abs().max() > 1  # the bias is really there


def test_output_bias_through_the_op_the_binding_and_torch_compile() -> None:
    from engine import _cmm

    x, w_in, b_in, w_out = make_problem(40, 64, 48, 4, 2, seed=5)
    bias = torch.randn(48)
    y_op, _ = torch.ops.ufb.cmm(x, w_in, b_in, w_out, 4, False, bias)
    y_eager, _ = _cmm.cmm_eager(x, w_in, b_in, w_out, 4, False, bias)
    assert torch.equal(y_op, y_eager)
    assert torch.equal(
        _cmm.cmm_eager(x, w_in, b_in, w_out, 4, False, None)[0], torch.ops.ufb.cmm(x, w_in, b_in, w_out, 4, False)[0]
    )

    def ffn(t: torch.Tensor) -> torch.Tensor:
        return C.cmm(t * 1.0, w_in, b_in, w_out, 4, b_out=bias)[0]

    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y_op, atol=FP32_TOL, rtol=0)
    for bad, message in [
        (torch.randn(47), "b_out must be \\[d_out\\]"),
        (torch.randn(48, 1), "b_out must be"),
        (torch.randn(48).double(), "contiguous float32"),
        (torch.randn(96)[::2], "contiguous"),
    ]:
        for call in (torch.ops.ufb.cmm, _cmm.cmm_eager):
            with pytest.raises(RuntimeError, match=message):
                call(x, w_in, b_in, w_out, 4, False, bad)
    with pytest.raises(ValueError, match="b_out must be"):
        C.cmm_reference(x, w_in, b_in, w_out, 4, torch.randn(47))


def test_force_path_rejects_unknown_names() -> None:
    from engine import _cmm

    with pytest.raises(RuntimeError, match="expected 'auto', 'avx2' or 'portable'"):
        _cmm.force_path("sse9")


def test_leaves_only_on_request_and_threads_agree() -> None:
    x, w_in, b_in, w_out = make_problem(777, 128, 128, 7, 2, seed=21)
    y_none, leaves_none = C.cmm(x, w_in, b_in, w_out, 7)
    assert leaves_none is None
    y_one, _ = on_one_thread(lambda: C.cmm(x, w_in, b_in, w_out, 7))
    assert torch.equal(y_none, y_one)  # each token is computed whole by one thread: bit-identical


def test_inference_mode_and_torch_compile() -> None:
    x, w_in, b_in, w_out = make_problem(16, 64, 32, 3, 2, seed=2)
    with torch.inference_mode():
        y_inf, _ = C.cmm(x, w_in, b_in, w_out, 3)

    def ffn(t: torch.Tensor) -> torch.Tensor:
        y, _ = C.cmm(t * 1.0, w_in, b_in, w_out, 3)  # traced: takes the custom op, not the eager binding
        return y + 1.0

    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), y_inf + 1.0, atol=FP32_TOL)


def test_eager_binding_equals_the_custom_op() -> None:
    """Eager calls use a direct binding of the op's C++ function; both must give the same bits."""
    from engine import _cmm

    for n, depth, trees in [(0, 3, 1), (1, 11, 1), (77, 5, 4), (1500, 11, 1)]:
        x, w_in, b_in, w_out = make_problem(n, 768 if depth == 11 else 96, 64, depth, trees, seed=n)
        y_op, leaves_op = torch.ops.ufb.cmm(x, w_in, b_in, w_out, depth, True)
        y_eager, leaves_eager = _cmm.cmm_eager(x, w_in, b_in, w_out, depth, True)
        assert torch.equal(y_op, y_eager) and torch.equal(leaves_op, leaves_eager)
        y_alone, leaves_alone = _cmm.cmm_eager(x, w_in, b_in, w_out, depth, False)
        assert torch.equal(y_alone, y_op) and leaves_alone is None  # no leaves tensor is made when none is asked
    with pytest.raises(RuntimeError, match="width"):
        _cmm.cmm_eager(x[:, :5], w_in, b_in, w_out, depth, False)


@pytest.mark.parametrize(
    "args,message",
    [
        ((), "takes 6 or 7 arguments, got 0"),
        (("x",), "takes 6 or 7 arguments, got 1"),
        ((torch.zeros(1, 8),) * 4 + (3, False, "bias"), "b_out must be a Tensor or None, got str"),
        ((torch.zeros(1, 8),) * 4 + (3, False, None, None), "takes 6 or 7 arguments, got 8"),
        ((None, "w_in", "b_in", "w_out", 3, False), "argument 0 must be a Tensor, got NoneType"),
        ((0, 1, 2, 3, 3, False), "argument 0 must be a Tensor"),
        ((torch.zeros(1, 8),) * 4 + (3.0, False), "depth must be an int, got float"),
        ((torch.zeros(1, 8),) * 4 + (2**70, False), "too big"),
    ],
)
def test_eager_binding_rejects_malformed_calls_with_type_errors(args: tuple, message: str) -> None:
    """The eager binding parses its arguments by hand (it skips pybind11), so it must refuse what pybind11 would."""
    from engine import _cmm

    with pytest.raises((TypeError, OverflowError), match=message):
        _cmm.cmm_eager(*args)


def test_eager_binding_lets_other_python_threads_run_during_large_calls() -> None:
    """A large call releases the GIL, as torch's own operators do: the service's event loop keeps answering while
    an inference thread runs the kernel. Measured as the longest pause of a Python loop on this thread while
    another thread computes: with the GIL held it is the whole call."""
    import threading
    import time

    from engine import _cmm

    x, w_in, b_in, w_out = make_problem(40_000, 256, 256, 11, 1, exact=False)

    def call() -> None:
        _cmm.cmm_eager(x, w_in, b_in, w_out, 11, False)

    # One kernel thread: the loop below then has the other core to itself, so its pauses are the GIL's, not the
    # scheduler's.
    start = time.perf_counter()
    on_one_thread(call)
    alone = time.perf_counter() - start
    assert alone > 0.02, "the call must be long enough to tell a held GIL from scheduling noise"

    def longest_pause_while_another_thread_calls() -> float:
        running, done = threading.Event(), threading.Event()

        def compute() -> None:
            running.set()
            for _ in range(3):
                call()
            done.set()

        worker = threading.Thread(target=compute)
        worker.start()
        running.wait()
        longest, last = 0.0, time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        worker.join()
        return longest

    longest = on_one_thread(longest_pause_while_another_thread_calls)
    assert longest < alone / 2, f"this thread stalled {longest * 1e3:.0f} ms during calls of {alone * 1e3:.0f} ms"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda p: (p[0][:, :5], *p[1:]), "width"),
        (lambda p: (p[0], p[1][:, :-1], p[2][:, :-1], p[3][:, :-1]), "nodes"),
        (lambda p: (p[0].double(), *p[1:]), "float32"),
        (lambda p: (p[0], p[1].bfloat16(), p[2], p[3]), "both"),
        (lambda p: (p[0], p[1].half(), p[2], p[3].bfloat16()), "both"),
        (lambda p: (p[0], p[1].double(), p[2], p[3].double()), "both"),
        (lambda p: (p[0], p[1].transpose(1, 2).contiguous().transpose(1, 2), p[2], p[3]), "contiguous"),
        (lambda p: (p[0], p[1], p[2][:1], p[3]), "b_in"),
    ],
)
def test_bad_arguments_raise_clear_errors(mutate, message: str) -> None:
    x, w_in, b_in, w_out = mutate(make_problem(4, 16, 16, 2, 2))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ufb.cmm(x, w_in, b_in, w_out, 2, False)


def test_pack_fff_weights_layout() -> None:
    trees, depth, d_in, d_out = 3, 2, 10, 6
    nodes = C.n_nodes(depth)
    lin_in_w = torch.randn(trees * nodes, d_in)
    lin_in_b = torch.randn(trees * nodes)
    lin_out_w = torch.randn(d_out, trees * nodes)
    w_in, b_in, w_out = C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees)
    assert torch.equal(w_in[1, 4], lin_in_w[nodes + 4])
    assert torch.equal(b_in[2, 0], lin_in_b[2 * nodes])
    assert torch.equal(w_out[1, 4], lin_out_w[:, nodes + 4])
    assert w_out.is_contiguous()
    w_in, b_in, w_out = C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees, torch.float16)
    assert w_in.dtype == w_out.dtype == torch.float16 and b_in.dtype == torch.float32
    assert torch.equal(w_out[1, 4], lin_out_w[:, nodes + 4].half()) and w_out.is_contiguous()
    with pytest.raises(ValueError, match="weight dtype"):
        C.pack_fff_weights(lin_in_w, lin_in_b, lin_out_w, trees, torch.float64)


@pytest.fixture
def pinned_split():
    """Pins the two-pass descent's split level for one test (-1, automatic, again afterwards)."""
    from engine import _cmm

    try:
        yield _cmm.force_split
    finally:
        _cmm.force_split(-1)


@pytest.mark.parametrize(
    "n,depth,trees", [(1, 1, 1), (7, 5, 4), (128, 5, 1), (1031, 11, 1), (4099, 11, 1), (300, 7, 2), (2000, 3, 1)]
)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_pass_descent_is_bit_identical_to_one_pass(
    n: int, depth: int, trees: int, wdtype: torch.dtype, isa: str, pinned_split
) -> None:
    """Large batches descend in two passes with the tokens re-ordered in between: every split level must give
    the one-pass result exactly (each token's sums are formed in the same order), routing included."""
    x, w_in, b_in, w_out = make_problem(n, 96, 40, depth, trees, seed=n + depth)
    w_in, w_out = w_in.to(wdtype), w_out.to(wdtype)
    pinned_split(0)
    y_one, leaves_one = C.cmm(x, w_in, b_in, w_out, depth, return_leaves=True)
    if wdtype == torch.float32:
        check_against_reference(x, w_in, b_in, w_out, depth)
    for split in sorted({1, max(1, depth // 2), depth}):
        pinned_split(split)
        y, leaves = C.cmm(x, w_in, b_in, w_out, depth, return_leaves=True)
        assert torch.equal(leaves, leaves_one), f"split {split}: routing differs"
        assert torch.equal(y, y_one), f"split {split}: output differs from the one-pass descent"


@pytest.mark.parametrize("n,trees", [(13, 1), (77, 3), (1031, 1), (4099, 1)])
def test_results_do_not_depend_on_grouping_on_random_data(n: int, trees: int, isa: str, pinned_split) -> None:
    """The tests above use dyadic data, whose sums are exact in any order, so they cannot see a change of
    summation order. On random data: one pass or two, one thread or two (tokens fall into different groups, and
    a group's last slots are partly filled differently), every token's output must be the same bits."""
    depth = 11 if trees == 1 else 5
    x, w_in, b_in, w_out = make_problem(n, 256, 40, depth, trees, seed=n, exact=False)
    pinned_split(0)
    y_one, _ = C.cmm(x, w_in, b_in, w_out, depth)
    y_one_thread, _ = on_one_thread(lambda: C.cmm(x, w_in, b_in, w_out, depth))
    assert torch.equal(y_one, y_one_thread), "thread count changed the result"
    if trees == 1:
        pinned_split(5)
        y_split, _ = C.cmm(x, w_in, b_in, w_out, depth)
        assert torch.equal(y_split, y_one), "the two-pass descent changed the result"
    # inside a larger call, each token's result is the same as in a call of its own group's size
    y_prefix, _ = C.cmm(x[: n // 2 + 3], w_in, b_in, w_out, depth)
    assert torch.equal(y_prefix, y_one[: n // 2 + 3])


def test_two_pass_descent_is_chosen_only_for_trees_beyond_the_l3_share(pinned_split) -> None:
    """The automatic choice (README "Kernel design"): the UltraFastBERT-1x11 tree sorts its tokens with float32
    weights (24 MB of rows) at a batch large enough to fill its buckets, and never with 16-bit weights (12 MB,
    where one pass measured faster), with a small batch, or with several trees; a pinned level wins."""
    from engine import _cmm

    def level(n: int, dtype: torch.dtype, trees: int = 1, depth: int = 11, width: int = 768) -> int:
        nodes = C.n_nodes(depth)
        w_in = torch.zeros(trees, nodes, width, dtype=dtype)
        return _cmm.split_level(torch.zeros(n, width), w_in, torch.zeros(trees, nodes), w_in, depth)

    split = level(8192, torch.float32)
    assert 1 <= split <= 11 and (8192 >> split) >= 8
    assert level(8192, torch.bfloat16) == 0 and level(8192, torch.float16) == 0
    assert level(4096, torch.bfloat16, width=2048) > 0  # 16-bit rows of a wider tree outgrow the share again
    assert level(64, torch.float32) == 0  # buckets would hold fewer than 8 tokens
    assert level(8192, torch.float32, trees=2) == 0
    assert level(8192, torch.float32, depth=5) == 0  # 378 KB of rows: far below the 16 MB floor
    pinned_split(3)
    assert level(8192, torch.float16) == 3


def test_two_pass_descent_on_real_widths_and_strided_input(pinned_split) -> None:
    x, w_in, b_in, w_out = make_problem(3000, 768, 768, 11, 1, seed=31, exact=False)
    wide = torch.cat([x, torch.ones(3000, 5)], dim=1)[:, :768]  # rows strided, elements adjacent
    pinned_split(6)
    y_split, _ = C.cmm(wide, w_in, b_in, w_out, 11)
    y_ref, _ = C.cmm_reference(x, w_in, b_in, w_out, 11)
    assert (y_split - y_ref).abs().max().item() <= FP32_TOL
    y_one_thread, _ = on_one_thread(lambda: C.cmm(wide, w_in, b_in, w_out, 11))
    assert torch.equal(y_split, y_one_thread)


def test_gelu_of_every_path_is_accurate(isa: str) -> None:
    """The vector paths approximate erf (Abramowitz & Stegun 7.1.26, as torch's vectorised CPU GELU does);
    one node with unit weights exposes GELU(a) itself, checked against float64 on a fine grid and extremes."""
    a = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38])])
    one = torch.ones(1, 1, 1)
    y, _ = C.cmm(a.unsqueeze(1), one, torch.zeros(1, 1), one, 0)
    exact = torch.nn.functional.gelu(a.double())
    # erf's absolute error <= 1.5e-7 becomes <= 0.75e-7 * |a| in GELU(a) = a / 2 * (1 + erf(a / sqrt 2)); with
    # float32 evaluation the worst seen is 1.7e-7 * max(1, |a|), about 2 ulp: the bound is 3e-7 * max(1, |a|).
    err = (y.squeeze(1).double() - exact).abs() / a.double().abs().clamp(min=1.0)
    assert err.max().item() <= 3e-7, f"worst error {err.max().item():.3g} (scaled) at a = {a[err.argmax()].item()}"
