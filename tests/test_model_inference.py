"""The inference-time machinery around the model: derived copies (packed FFF weights, fused QKV) that follow their
parameters, the one-call FFF serving path, torch.compile with the kernel in the graph, and per-thread leaves."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batch, tiny_model

from engine import cmm as C
from engine.fff import FFF

torch.set_num_threads(2)


def test_fff_built_and_run_under_inference_mode() -> None:
    """Inference tensors have no version counter; the packed-weight cache must still work on them."""
    from engine.fff import FFF

    with torch.inference_mode():
        fff = FFF(32, 16, 3, trees=2).eval()
        x = torch.randn(5, 32)
        first = fff(x)
        assert torch.equal(fff(x), first)
        fff.impl = "reference"
        assert torch.allclose(fff(x), first, atol=1e-5)


def test_fused_projection_at_inference_matches_the_three_projections_and_follows_changes() -> None:
    """Inference runs BERT's query/key/value as one fused GEMM; it must equal the separate projections (the
    training path) and be rebuilt after a weight changes in place."""
    model = tiny_model("bert", ffn="dense")
    ids, mask = random_batch([9, 4, 1])
    with torch.enable_grad():
        separate = model.embed(ids, mask).detach()
    with torch.inference_mode():
        fused = model.embed(ids, mask)
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-5)
    attention = model.layers[0].attention
    with torch.no_grad():
        attention.key.weight.mul_(-1.5)
        attention.value.bias.add_(0.25)
    with torch.enable_grad():
        separate2 = model.embed(ids, mask).detach()
    with torch.inference_mode():
        fused2 = model.embed(ids, mask)
    assert (separate2 - separate).abs().max() > 1e-3  # the change matters ...
    torch.testing.assert_close(fused2, separate2, rtol=0, atol=1e-5)  # ... and the fused copy followed it


def test_derived_copies_follow_their_parameters() -> None:
    """engine.derived rebuilds on an in-place change, a replaced storage or a new `extra`, and only then;
    inference tensors (no version counter) work too."""
    from engine.derived import Derived

    builds = []
    p = torch.nn.Parameter(torch.ones(3))
    cache: Derived[torch.Tensor] = Derived()

    def build() -> torch.Tensor:
        builds.append(1)
        return p.detach() * 2

    assert torch.equal(cache.get([p], build), torch.full((3,), 2.0)) and len(builds) == 1
    cache.get([p], build)
    assert len(builds) == 1  # unchanged: no rebuild
    with torch.no_grad():
        p.add_(1.0)
    assert torch.equal(cache.get([p], build), torch.full((3,), 4.0)) and len(builds) == 2
    p.data = torch.zeros(3)
    assert torch.equal(cache.get([p], build), torch.zeros(3)) and len(builds) == 3
    cache.get([p], build, extra=torch.bfloat16)
    assert len(builds) == 4
    with torch.inference_mode():
        frozen = torch.ones(2)
    assert torch.equal(cache.get([frozen], lambda: frozen + 1), torch.full((2,), 2.0))
    cache.clear()
    cache.get([p], build)
    assert len(builds) == 5


@pytest.mark.skipif(not C.KERNEL.compiled, reason="needs the compiled extension")
def test_compiled_stamp_changes_exactly_when_the_python_stamp_does() -> None:
    """engine.derived uses the extension's tensor_stamp on every inference call; it must see the same changes as
    the Python reads it replaced (in place, new storage, another tensor, a view), and no others."""
    from engine import _cmm
    from engine.derived import python_stamp, stamp

    assert stamp is _cmm.tensor_stamp
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))
    with torch.inference_mode():
        frozen = torch.ones(4)

    def both() -> tuple[object, object]:
        return _cmm.tensor_stamp(a, b, frozen), python_stamp(a, b, frozen)

    def change_a_in_place() -> None:
        with torch.no_grad():
            a.mul_(2.0)

    def replace_b_storage() -> None:
        b.data = torch.zeros(2, 2)

    def swap_a() -> None:
        nonlocal a
        a = torch.nn.Parameter(a.detach().clone())

    def shrink_b() -> None:
        b.data = b.data[:1]  # same first element, same data pointer, fewer elements

    events = [
        (lambda: None, False),
        (lambda: a.detach().sum(), False),
        (change_a_in_place, True),
        (replace_b_storage, True),
        (swap_a, True),
        (shrink_b, True),
    ]
    for event, changes in events:
        native, plain = both()
        event()
        native_after, plain_after = both()
        assert (native != native_after) is changes and (plain != plain_after) is changes
    assert _cmm.tensor_stamp() == b""
    with pytest.raises(TypeError, match="argument 1 must be a Tensor"):
        _cmm.tensor_stamp(a, "weight")


@pytest.mark.skipif(not C.KERNEL.compiled, reason="needs the compiled extension")
@pytest.mark.parametrize("bias_out", [False, True])
def test_fff_forward_in_one_call_serves_exactly_the_serving_case(bias_out: bool) -> None:
    """FFF.forward's serving case runs as one extension call (csrc/python/fast_path.cpp fff_forward). It must give the
    Python path's bits, record leaves as it does, and decline (NotImplemented) whenever the Python path has to
    decide: before the first packing, after any parameter change, in training mode, for other impls, inputs and
    weight dtypes, and with a Python-made stamp. Declining must never raise."""
    import threading

    from engine import _cmm, derived

    torch.manual_seed(4)
    fff = FFF(24, 20, 3, trees=2, bias_out=bias_out).eval()
    if bias_out:
        with torch.no_grad():
            fff.linear_out.bias.uniform_(-1, 1)
    x = torch.randn(7, 24)

    def kernel_path() -> torch.Tensor:
        w_in, b_in, w_out = fff.packed_weights()
        bias = fff.linear_out.bias.detach() if bias_out else None
        return C.cmm(x, w_in, b_in, w_out, 3, False, bias)[0]

    with torch.inference_mode():
        assert _cmm.fff_forward(fff, x) is NotImplemented  # nothing packed yet
        want = fff(x)  # the Python path packs ...
        assert torch.equal(_cmm.fff_forward(fff, x), want)  # ... and from then on the single call serves
        assert torch.equal(want, kernel_path())
        fff.record_leaves = True
        assert torch.equal(_cmm.fff_forward(fff, x), want)
        _, ref_leaves = C.cmm_reference(x, *fff.packed_weights(), 3)
        assert torch.equal(fff.last_leaves, ref_leaves)
        fff.record_leaves = False
        for bad_x in (x.double(), x.unsqueeze(0), x[:, :23], x[:0, :23], torch.randn(24), "x", None):
            assert _cmm.fff_forward(fff, bad_x) is NotImplemented
        assert _cmm.fff_forward(object(), x) is NotImplemented  # no FFF attributes: declined, not an error
        torch.testing.assert_close(fff(x.unsqueeze(0))[0], want, atol=0, rtol=0)
        with pytest.raises(ValueError, match="FFF expects inputs of width 24"):
            fff(x[:, :23])
        assert torch.equal(_cmm.fff_forward(fff, x[:0]), want[:0])  # zero tokens: served, [0, d_out]
        assert torch.equal(_cmm.fff_forward(fff, x[::2]), want[::2])  # strided rows
    # each parameter, changed in place, makes the single call decline until the Python path repacks
    for param in [fff.linear_in.weight, fff.linear_in.bias, fff.linear_out.weight] + (
        [fff.linear_out.bias] if bias_out else []
    ):
        with torch.no_grad():
            param.mul_(1.5)
        with torch.inference_mode():
            assert _cmm.fff_forward(fff, x) is NotImplemented
            fresh = fff(x)
            assert torch.equal(fresh, kernel_path())
            assert torch.equal(_cmm.fff_forward(fff, x), fresh)
    fff.linear_in.weight = torch.nn.Parameter(fff.linear_in.weight.detach().clone())  # replaced, same values
    with torch.inference_mode():
        assert _cmm.fff_forward(fff, x) is NotImplemented
        fresh = fff(x)
        for undo, change in [
            (lambda: fff.train(False), lambda: fff.train(True)),
            (lambda: setattr(fff, "impl", "kernel"), lambda: setattr(fff, "impl", "reference")),
            (lambda: setattr(fff, "weight_dtype", torch.float32), lambda: setattr(fff, "weight_dtype", torch.bfloat16)),
        ]:
            change()
            assert _cmm.fff_forward(fff, x) is NotImplemented
            undo()
            fff(x)
            assert torch.equal(_cmm.fff_forward(fff, x), fresh)
        derived.stamp = derived.python_stamp
        try:
            fff.invalidate()
            assert torch.equal(fff(x), fresh)
            assert _cmm.fff_forward(fff, x) is NotImplemented  # a tuple stamp: the Python path compares it
        finally:
            derived.stamp = _cmm.tensor_stamp
            fff.invalidate()
    with pytest.raises(TypeError, match="takes 2 arguments, got 1"):
        _cmm.fff_forward(fff)
    # leaves land under the calling thread's id, as threading.get_ident() names it
    fff.record_leaves = True
    with torch.inference_mode():
        fff(x)
        seen: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: seen.update(served=_cmm.fff_forward(fff, x[:2]), ident=threading.get_ident())
        )
        worker.start()
        worker.join()
    assert isinstance(seen["served"], torch.Tensor)
    assert fff._leaves[seen["ident"]].shape == (2, 2) and fff.last_leaves.shape == (7, 2)


@pytest.mark.skipif(not C.KERNEL.compiled, reason="needs the compiled extension")
def test_fff_and_model_compile_with_the_kernel_in_the_graph() -> None:
    """torch.compile traces the FFF's kernel path whole (fullgraph): traced code cannot check the packed weights'
    stamps, so it takes the copy as last packed, which an eager call refreshes, or packs inside the graph when none
    exists yet. A whole model compiles with no graph break at its FFNs or fused Q/K/V."""
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    x = torch.randn(9, 24)
    for dtype in (torch.float32, torch.float16):
        torch._dynamo.reset()
        fff = FFF(24, 20, 3, trees=2, bias_out=True, weight_dtype=dtype).eval()
        with torch.inference_mode():
            eager = fff(x)
            compiled = torch.compile(fff, fullgraph=True, backend="aot_eager")
            assert torch.equal(compiled(x), eager)
            with torch.no_grad():
                fff.linear_out.weight.mul_(-2.0)
            eager_after = fff(x)  # the eager call repacks ...
            assert not torch.equal(eager_after, eager)
            assert torch.equal(compiled(x), eager_after)  # ... and the compiled module reads the new copy
    torch._dynamo.reset()
    fresh = FFF(24, 20, 3, trees=2).eval()  # nothing packed: the graph packs
    with torch.inference_mode():
        got = torch.compile(fresh, fullgraph=True, backend="aot_eager")(x)
        want, _ = C.cmm_reference(x, *fresh.packed_weights(), 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    for layout in ("bert", "crammed"):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(layout)
        model.pack_inference_weights()
        ids, mask = random_batch([9, 4, 1])
        with torch.inference_mode():
            eager = model(ids, mask)
            traced = torch.compile(model, backend="aot_eager")(ids, mask)
        torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)
        breaks = " ".join(counters["graph_break"])
        assert "tensor_stamp" not in breaks and "fff_forward" not in breaks and "skipped" not in breaks, breaks


def test_fused_projection_follows_the_three_projections() -> None:
    torch.manual_seed(0)
    model = tiny_model("bert")
    attention = model.layers[0].attention
    x = torch.randn(1, 5, model.config.hidden_size)
    mask = torch.zeros(1, 1, 1, 5)
    with torch.inference_mode():
        before = attention(x, mask)
    with torch.no_grad():
        attention.key.weight.mul_(0.5)
    with torch.inference_mode():
        after = attention(x, mask)
    with torch.no_grad():
        expected = attention(x, mask)  # grad mode off but not inference: the three separate projections
    assert not torch.allclose(before, after) and torch.allclose(after, expected, atol=1e-6)


def test_leaves_are_recorded_per_thread_when_workers_share_a_model() -> None:
    """Two inference workers on one model: each reads the leaves of its own forward, never the other's."""
    import threading

    model = tiny_model("bert", trees=2, depth=4)
    model.set_record_leaves(True)
    inputs = {0: [[5, 6, 7, 8, 9, 10, 11]] * 3, 1: [[40, 41], [42, 43, 44]]}
    with torch.inference_mode():
        want = {}
        for k, ids in inputs.items():
            model.embed_ids(ids)
            want[k] = model.last_leaves()
    errors: list[str] = []
    start = threading.Barrier(2)

    def worker(k: int) -> None:
        start.wait()
        with torch.inference_mode():
            for _ in range(50):
                model.embed_ids(inputs[k])
                got = model.last_leaves()
                if got is None or any(not torch.equal(a, b) for a, b in zip(got, want[k])):
                    errors.append(
                        f"worker {k} read leaves of shape {None if got is None else [tuple(g.shape) for g in got]}"
                    )
                    return

    threads = [threading.Thread(target=worker, args=(k,)) for k in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
