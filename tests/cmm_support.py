"""Helpers shared by the CMM kernel tests: problems built from dyadic data, the comparison with the plain-PyTorch
reference, and the ``isa`` fixture that runs a test on every instruction-set path this CPU has."""

from __future__ import annotations

import pytest
import torch

from engine import cmm as C

FP32_TOL = 1e-5
# bf16 weights: the kernel equals the reference run on the same bf16-rounded weights to FP32_TOL. Against the
# original float32 weights the rounding (8 mantissa bits) may flip a decision that was within ~0.4 % of zero;
# for tokens whose routing is unchanged the output error stays below BF16_REL_BOUND of max |y| (measured
# about 0.3-0.5 % here on N(0, 1) data).
BF16_REL_BOUND = 2e-2
# float16 weights: likewise equal to the reference on the same float16-rounded weights to FP32_TOL. Against the
# float32 weights, float16 keeps 11 significant bits (unit roundoff u = 2^-11 = 4.9e-4, vs 2^-8 for bf16); the
# bound is the bf16 one scaled by the 8x smaller roundoff, about 5u (measured 0.03-0.04 % here, about 8x below
# bfloat16 on the same data), and fewer decisions flip.
FP16_REL_BOUND = 2.5e-3


def dyadic(shape: tuple[int, ...], scale: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform integers in [-steps, steps] times scale / steps: exact sums in float32."""
    return torch.randint(-steps, steps + 1, shape, generator=gen).float() * (scale / steps)


def make_problem(n: int, d_in: int, d_out: int, depth: int, trees: int, seed: int = 0, exact: bool = True):
    gen = torch.Generator().manual_seed(seed)
    nodes = C.n_nodes(depth)
    if exact:
        # Coarse grids: pre-activations are multiples of 1/32, so a few percent are exactly zero.
        x = dyadic((n, d_in), 1.0, 2, gen)
        w_in = dyadic((trees, nodes, d_in), 0.125, 2, gen)
        b_in = dyadic((trees, nodes), 0.125, 2, gen)
    else:
        x = torch.randn((n, d_in), generator=gen)
        w_in = torch.randn((trees, nodes, d_in), generator=gen) / d_in**0.5
        b_in = torch.randn((trees, nodes), generator=gen) * 0.1
    w_out = torch.randn((trees, nodes, d_out), generator=gen) * 0.05
    return x, w_in, b_in, w_out


def on_one_thread(call):  # type: ignore[no-untyped-def]
    """``call()`` with torch limited to one thread (the kernel's threads split tokens, never one token's sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return call()
    finally:
        torch.set_num_threads(threads)


def check_against_reference(x, w_in, b_in, w_out, depth, tol=FP32_TOL):
    y, leaves = C.cmm(x, w_in, b_in, w_out, depth, return_leaves=True)
    y_ref, leaves_ref = C.cmm_reference(x, w_in, b_in, w_out, depth)
    assert y.shape == (x.shape[0], w_out.shape[2]) and y.dtype == torch.float32
    assert leaves.shape == (x.shape[0], w_in.shape[0])
    assert torch.equal(leaves, leaves_ref), "routing differs from the reference"
    if x.shape[0]:
        err = (y - y_ref).abs().max().item()
        assert err <= tol, f"max abs error {err:.3g} > {tol}"
    return y, leaves


def _available_paths() -> list[str]:
    """Every instruction-set path this CPU runs: the widest ("native"), AVX2 below it, and portable."""
    if not C.KERNEL.compiled:
        return ["native"]
    from engine import _cmm

    native = _cmm.cpu_path()
    return ["native"] + (["avx2"] if native == "avx512" else []) + (["portable"] if native != "portable" else [])


@pytest.fixture(params=_available_paths())
def isa(request: pytest.FixtureRequest):
    """Runs a test on the path this CPU picks (AVX-512 or AVX2 here) and again on each narrower path."""
    from engine import _cmm

    if request.param != "native":
        _cmm.force_path(request.param)
    try:
        if request.param != "native":
            assert _cmm.cpu_path().startswith(request.param)
        yield request.param
    finally:
        _cmm.force_path("auto")


def half(x, w_in, b_in, w_out):
    """The problem with float16 weights; the reference then runs on exactly these rounded weights."""
    return x, w_in.half(), b_in, w_out.half()
