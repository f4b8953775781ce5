"""Self-attention over packed sequences (torch.ops.ufb.varlen_attention, engine.attention) against torch's
scaled_dot_product_attention per sequence, on the shapes that break kernels (one token, no tokens, empty
sequences, head widths off every vector width, long sequences, large scores), on every instruction-set path this CPU
has; a sequence's result bit-identical alone, in any batch and at any thread count; argument errors; and which calls
go to SDPA instead (gradients, autocast, other dtypes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmm_support import isa, on_one_thread  # noqa: F401  (isa is a fixture)
from tiny_models import random_batch, tiny_model

from engine import attention
from engine import cmm as C
from engine.packing import pack

pytestmark = pytest.mark.skipif(not attention.available(), reason=f"attention kernel not built: {C.KERNEL.error}")

OP = torch.ops.ufb.varlen_attention.default


def problem(lengths: list[int], heads: int, head_dim: int, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    qkv = torch.randn(n, 3 * heads * head_dim, generator=gen) * scale
    starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.int64)
    return qkv, starts, torch.tensor(lengths, dtype=torch.int64)


def reference(qkv: torch.Tensor, lengths: list[int], heads: int, head_dim: int) -> torch.Tensor:
    out, start = [], 0
    for t in lengths:
        q, k, v = qkv[start : start + t].view(1, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t, heads * head_dim))
        start += t
    return torch.cat(out) if out else qkv.new_empty(0, heads * head_dim)


LENGTHS = [[1], [7], [1, 2, 3], [9, 9, 9], [5, 40, 17, 1, 64], [3, 0, 2], [130], [16, 17, 31, 32, 33]]


@pytest.mark.parametrize("heads,head_dim", [(12, 32), (3, 13), (1, 1), (2, 8), (4, 17), (1, 64), (2, 40)])
def test_matches_sdpa_per_sequence(heads: int, head_dim: int, isa: str) -> None:
    for i, lengths in enumerate(LENGTHS):
        for scale in (1.0, 8.0):  # large scores: the softmax must subtract its maximum
            qkv, starts, lens = problem(lengths, heads, head_dim, seed=i * 100 + heads + head_dim, scale=scale)
            y = OP(qkv, starts, lens, heads)
            assert y.shape == (sum(lengths), heads * head_dim) and y.dtype == torch.float32
            if not y.numel():
                continue
            # Against the float64 result. A score's float32 rounding grows with |q| |k| (scale^2) and moves the
            # output by that times |v| (scale): float32 SDPA itself is off by up to ~5e-7 at scale 1 and ~4e-4 at 8
            # on these problems.
            exact = reference(qkv.double(), lengths, heads, head_dim)
            error = (y - exact).abs().max().item()
            assert error <= 2e-6 * scale**3, error
            assert torch.equal(attention._EAGER(qkv, starts, lens, heads), y)  # the eager binding: same computation


def test_no_tokens_no_sequences_and_one_token() -> None:
    none = torch.zeros(0, dtype=torch.int64)
    assert OP(torch.randn(0, 24), none, none, 2).shape == (0, 8)
    qkv, starts, lens = problem([0, 0], 2, 4, seed=1)
    assert OP(qkv, starts, lens, 2).shape == (0, 8)
    qkv, starts, lens = problem([1], 3, 5, seed=2)
    # one token attends to itself only: the output is its v
    assert torch.allclose(OP(qkv, starts, lens, 3), qkv[:, 30:], atol=1e-6)


def test_ties_give_the_mean_of_the_values() -> None:
    """All scores equal (q = 0): every key weighs 1/t, exactly the mean of v."""
    t, heads, d = 37, 2, 8
    qkv = torch.randn(t, 3 * heads * d)
    qkv[:, : heads * d] = 0
    y = OP(qkv, torch.tensor([0]), torch.tensor([t]), heads)
    torch.testing.assert_close(y, qkv[:, 2 * heads * d :].mean(0, keepdim=True).expand(t, -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads,head_dim", [(12, 32), (3, 13)])
def test_a_sequence_is_bit_identical_alone_and_in_any_batch(heads: int, head_dim: int, isa: str) -> None:
    lengths = [3, 50, 1, 17, 17, 90, 8, 33]
    qkv, starts, lens = problem(lengths, heads, head_dim, seed=5)
    batch = on_one_thread(lambda: OP(qkv, starts, lens, heads))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(OP(qkv, starts, lens, heads), batch)  # items split over two threads
    finally:
        torch.set_num_threads(threads)
    for i, t in enumerate(lengths):
        s = int(starts[i])
        alone = OP(qkv[s : s + t], torch.tensor([0]), torch.tensor([t]), heads)
        assert torch.equal(alone, batch[s : s + t]), f"sequence {i} differs alone"
    # another batch around sequence 3: the same rows again
    sub = lengths[3:6]
    s = int(starts[3])
    part = OP(qkv[s : s + sum(sub)], torch.tensor([0, sub[0], sub[0] + sub[1]]), torch.tensor(sub), heads)
    assert torch.equal(part, batch[s : s + sum(sub)])


def test_strided_rows_are_read_in_place_and_strided_columns_copied() -> None:
    qkv, starts, lens = problem([4, 9], 2, 8, seed=6)
    wide = torch.randn(13, 60)
    wide[:, 5:53] = qkv
    assert torch.equal(OP(wide[:, 5:53], starts, lens, 2), OP(qkv, starts, lens, 2))
    cols = torch.randn(13, 96)[:, ::2]
    assert torch.equal(OP(cols, starts, lens, 2), OP(cols.contiguous(), starts, lens, 2))


def test_bad_arguments_raise_clear_errors() -> None:
    qkv, starts, lens = problem([3, 4], 2, 4, seed=7)
    with pytest.raises(RuntimeError, match="float32"):
        OP(qkv.double(), starts, lens, 2)
    with pytest.raises(RuntimeError, match=r"qkv must be \[N, 3 \* hidden\]"):
        OP(qkv.unsqueeze(0), starts, lens, 2)
    with pytest.raises(RuntimeError, match="not 3 \\* num_heads \\* head_dim"):
        OP(qkv, starts, lens, 5)
    with pytest.raises(RuntimeError, match="num_heads must be at least 1"):
        OP(qkv, starts, lens, 0)
    with pytest.raises(RuntimeError, match="int64"):
        OP(qkv, starts.int(), lens, 2)
    with pytest.raises(RuntimeError, match="1-D of one size"):
        OP(qkv, starts, lens[:1], 2)
    with pytest.raises(RuntimeError, match="sequences must lie one after another"):
        OP(qkv, torch.tensor([0, 2]), lens, 2)
    with pytest.raises(RuntimeError, match="sequences must lie one after another"):
        OP(qkv, torch.tensor([0, 3]), torch.tensor([3, -1]), 2)
    with pytest.raises(RuntimeError, match="cover 6 rows of qkv's 7"):
        OP(qkv, torch.tensor([0, 3]), torch.tensor([3, 3]), 2)
    with pytest.raises(RuntimeError, match="sequences must lie one after another"):
        attention._EAGER(qkv, torch.tensor([1, 3]), lens, 2)


def test_what_goes_to_sdpa() -> None:
    """The kernel takes float32 CPU calls with nothing to record for autograd and no autocast; training, bfloat16
    autocast and other dtypes keep SDPA per length group, with its gradients."""
    lengths = [3, 6, 6]
    _, packing = pack([[1] * t for t in lengths])
    qkv = torch.randn(15, 3, 2, 8)
    kernel = attention.packed(qkv, packing, 2)
    assert torch.equal(kernel, OP(qkv.reshape(15, -1), packing.starts, packing.lengths, 2))
    torch.testing.assert_close(attention.by_length_group(qkv, packing), kernel, atol=1e-5, rtol=1e-5)
    leaf = qkv.clone().requires_grad_(True)
    y = attention.packed(leaf, packing, 2)
    assert y.grad_fn is not None
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.packed(qkv.bfloat16(), packing, 2).dtype == torch.bfloat16
    assert attention.packed(qkv.double(), packing, 2).dtype == torch.float64
    attention.use_kernel(False)
    try:
        assert torch.equal(attention.packed(qkv, packing, 2), attention.by_length_group(qkv, packing))
    finally:
        attention.use_kernel(True)


@pytest.mark.parametrize("layout", ["bert", "crammed"])
def test_models_serve_through_the_kernel_as_through_sdpa(layout: str) -> None:
    model = tiny_model(layout, ffn="dense")
    ids, mask = random_batch([5, 13, 2, 9, 1, 30], seed=3)
    lists = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]
    with torch.inference_mode():
        kernel = model.embed_ids(lists)
        attention.use_kernel(False)
        try:
            sdpa = model.embed_ids(lists)
        finally:
            attention.use_kernel(True)
        alone = torch.cat([model.embed_ids([x]) for x in lists])
    torch.testing.assert_close(kernel, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, kernel, atol=1e-6, rtol=1e-6)
