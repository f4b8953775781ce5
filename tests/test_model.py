"""Model, FFF layer and tokenizer: implementations agree, padding is invisible, the tokenizer truncates right."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine import cmm as C
from engine.config import ModelConfig
from engine.fff import FFF
from engine.model import UltraFastBert
from engine.packing import length_groups
from engine.tokenizer import InputTooLongError, Tokenizer

torch.set_num_threads(2)


def tiny_model(
    layout: str, ffn: str = "fff", trees: int = 2, depth: int = 3, labels=None, seed: int = 0, vocab: int = 120
) -> UltraFastBert:
    config = ModelConfig(
        layout=layout,
        vocab_size=vocab,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn=ffn,
        fff_trees=trees,
        fff_depth=depth,
        intermediate_size=64,
        max_position_embeddings=64,
        labels=labels,
        classifier_dim=48 if labels and layout == "crammed" else None,
    )
    model = UltraFastBert(config)
    model.init_weights(seed)
    return model.eval()


def random_batch(lengths: list[int], vocab: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------- FFF layer


@pytest.mark.parametrize("trees,depth", [(1, 0), (1, 4), (3, 2)])
def test_fff_impls_agree(trees: int, depth: int) -> None:
    torch.manual_seed(0)
    fff = FFF(24, 16, depth, trees).eval()
    x = torch.randn(5, 7, 24)
    out = {}
    for impl in ("masked", "reference", "kernel"):
        fff.impl = impl
        fff.record_leaves = True
        with torch.inference_mode():
            out[impl] = (fff(x), fff.last_leaves)
    for impl in ("reference", "kernel"):
        assert out[impl][0].shape == (5, 7, 16)
        torch.testing.assert_close(out[impl][0], out["masked"][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[impl][1], out["masked"][1])
    assert out["kernel"][1].shape == (35, trees)
    assert int(out["kernel"][1].max()) < 2**depth


def test_fff_masked_matches_explicit_descent() -> None:
    """The masked implementation against a per-token walk of the trees (heap order, ties go left)."""
    torch.manual_seed(1)
    fff = FFF(8, 6, 2, 2).eval()
    fff.impl = "masked"
    x = torch.randn(4, 8)
    with torch.no_grad():
        got = fff(x)
        w_in, b_in, w_out = fff.linear_in.weight, fff.linear_in.bias, fff.linear_out.weight
        for t in range(4):
            want = torch.zeros(6)
            for k in range(2):
                node = 0
                for _ in range(3):
                    row = k * 7 + node
                    a = float(w_in[row] @ x[t] + b_in[row])
                    want += torch.nn.functional.gelu(torch.tensor(a)) * w_out[:, row]
                    node = 2 * node + 1 if a <= 0 else 2 * node + 2
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)


def test_fff_training_gradients_reach_visited_neurons_only() -> None:
    torch.manual_seed(2)
    fff = FFF(8, 4, 3, 1).train()
    x = torch.randn(1, 8)
    fff.record_leaves = True
    fff(x).sum().backward()
    touched = (fff.linear_in.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    leaf = int(fff.last_leaves[0, 0])
    node, path = leaf + 2**3 - 1, []
    while True:
        path.append(node)
        if node == 0:
            break
        node = (node - 1) // 2
    assert sorted(touched) == sorted(path)
    assert (fff.linear_out.weight.grad.abs().sum(0) > 0).sum() == 4  # D + 1 columns


def test_fff_straight_through_routing_keeps_the_forward_and_gives_splits_a_gradient() -> None:
    """``routing_tau > 0``: the same outputs as hard routing, the mask's gradient that of soft routing, whose reach
    probabilities follow the tree (checked against a node-by-node recursion) and harden as tau falls."""
    torch.manual_seed(3)
    fff = FFF(12, 5, 3, 2).train()
    x = torch.randn(40, 12)
    hard = fff(x)
    fff.routing_tau = 0.5
    assert torch.equal(fff(x), hard)
    with torch.no_grad():
        fff.eval()
        assert torch.allclose(fff(x), hard, atol=1e-5)  # the kernel computes the function that is trained
        fff.train()
    logits = fff.linear_in(x).view(40, 2, fff.n_nodes).detach()
    reach = fff._soft_reach(logits)
    right = torch.sigmoid(logits / (0.5 * logits.std(0, keepdim=True)))
    expected = torch.ones_like(reach)
    for node in range(1, fff.n_nodes):
        parent = (node - 1) // 2
        expected[:, :, node] = expected[:, :, parent] * (
            right[:, :, parent] if node % 2 == 0 else 1 - right[:, :, parent]
        )
    assert torch.allclose(reach, expected, atol=1e-6)
    for level in range(4):
        assert torch.allclose(reach[:, :, 2**level - 1 : 2 ** (level + 1) - 1].sum(2), torch.ones(40, 2))
    fff.routing_tau = 1e-4
    _, leaves = fff.path_activations(x)
    near_hard = fff._soft_reach(logits)[:, :, fff.n_nodes // 2 :]  # leaf level
    assert (near_hard.argmax(2) == leaves).float().mean() > 0.95

    x1 = torch.randn(1, 12)
    # hard: the 4 visited nodes of each tree; soft: every inner node's split, and the visited leaf (a leaf splits
    # nothing, so an unvisited leaf's row has no effect)
    for tau, rows_touched in ((0.0, 2 * 4), (0.5, 2 * (fff.n_nodes // 2 + 1))):
        fff.zero_grad()
        fff.routing_tau = tau
        fff(x1).sum().backward()
        assert int((fff.linear_in.weight.grad.abs().sum(1) > 0).sum()) == rows_touched


def test_fff_repacks_after_parameter_change_and_supports_bf16() -> None:
    torch.manual_seed(3)
    fff = FFF(16, 16, 3, 2).eval()
    x = torch.randn(6, 16)
    with torch.inference_mode():
        before = fff(x)
    with torch.no_grad():
        fff.linear_out.weight.mul_(2.0)  # in place: same data_ptr, new _version
    with torch.inference_mode():
        after = fff(x)
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)
    fff.weight_dtype = torch.bfloat16
    with torch.inference_mode():
        bf16 = fff(x)
    assert fff.packed_weights()[0].dtype == torch.bfloat16
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, after, atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError):
        fff.impl = "fast"


# ---------------------------------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("layout", ["bert", "crammed"])
@pytest.mark.parametrize("trees,depth,lengths", [(1, 4, [9]), (2, 3, [12, 5, 1]), (3, 1, [7, 7, 3, 16])])
def test_model_kernel_matches_masked_and_reference(layout: str, trees: int, depth: int, lengths: list[int]) -> None:
    model = tiny_model(layout, trees=trees, depth=depth, seed=trees + depth)
    ids, mask = random_batch(lengths, seed=len(lengths))
    results = {}
    for impl in ("masked", "reference", "kernel"):
        model.set_ffn_impl(impl)
        model.set_record_leaves(True)
        with torch.inference_mode():
            results[impl] = (model(ids, mask), model.embed(ids, mask), model.last_leaves())
    real = mask.bool()
    for impl in ("reference", "kernel"):
        torch.testing.assert_close(results[impl][0][real], results["masked"][0][real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(results[impl][1], results["masked"][1], atol=1e-4, rtol=1e-4)
    leaves = results["kernel"][2]
    assert len(leaves) == 2 and all(t.shape == (sum(lengths), trees) for t in leaves)


@pytest.mark.parametrize("layout", ["bert", "crammed"])
@pytest.mark.parametrize("ffn", ["fff", "dense", "none"])
def test_embedding_is_the_same_alone_and_in_a_padded_batch(layout: str, ffn: str) -> None:
    model = tiny_model(layout, ffn=ffn, labels=["a", "b", "c"])
    ids, mask = random_batch([5, 13, 2, 9], seed=7)
    with torch.inference_mode():
        batch = model.embed(ids, mask)
        logits = model.classify(ids, mask)
        for row in range(4):
            n = int(mask[row].sum())
            alone = model.embed(ids[row : row + 1, :n], mask[row : row + 1, :n])
            torch.testing.assert_close(batch[row : row + 1], alone, atol=1e-5, rtol=1e-5)
            alone_logits = model.classify(ids[row : row + 1, :n], mask[row : row + 1, :n])
            torch.testing.assert_close(logits[row : row + 1], alone_logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (4, 3)


def _token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]


@pytest.mark.parametrize("layout", ["bert", "crammed"])
@pytest.mark.parametrize("ffn", ["fff", "dense", "none"])
@pytest.mark.parametrize("lengths", [[1], [9, 9, 9], [5, 13, 2, 9, 1, 30, 13], [64, 1, 33, 2]])
def test_packed_path_equals_the_padded_model(layout: str, ffn: str, lengths: list[int]) -> None:
    """The serving path (unpadded tokens, attention per length group) against the padded forward, per sequence."""
    model = tiny_model(layout, ffn=ffn, labels=["a", "b", "c"], seed=len(lengths))
    ids, mask = random_batch(lengths, seed=sum(lengths))
    lists = _token_lists(ids, mask)
    with torch.inference_mode():
        for cls in (False, True):
            model.config.pooling = "cls" if cls else "mean"
            for ratio in (1.0, 1.25, 100.0):  # one group per length .. everything in one padded group
                torch.testing.assert_close(
                    model.embed_ids(lists, max_padding_ratio=ratio), model.embed(ids, mask), atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(
                    model.embed_ids(lists, normalize=False, max_padding_ratio=ratio),
                    model.embed(ids, mask, normalize=False),
                    atol=1e-5,
                    rtol=1e-5,
                )
                torch.testing.assert_close(
                    model.classify_ids(lists, max_padding_ratio=ratio), model.classify(ids, mask), atol=1e-5, rtol=1e-5
                )


def test_packed_path_records_every_real_token_leaf_once() -> None:
    model = tiny_model("bert", trees=3, depth=2)
    ids, mask = random_batch([4, 11, 1], seed=3)
    model.set_record_leaves(True)
    with torch.inference_mode():
        model.embed(ids, mask)
        padded = model.last_leaves()
        model.embed_ids(_token_lists(ids, mask))
        packed = model.last_leaves()
    assert all(p.shape == (16, 3) for p in packed)
    for a, b in zip(padded, packed):  # same multiset of (leaf per tree) rows; packed order is by length
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_length_groups_bound_padding_and_keep_every_input() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 128) for _ in range(rng.randint(0, 64))]
        chunks = length_groups(lengths, 1.25)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        for chunk in chunks:
            padded = max(lengths[i] for i in chunk) * len(chunk)
            assert len(chunk) == 1 or padded <= 1.25 * sum(lengths[i] for i in chunk)
    assert length_groups([5, 5, 5], 1.25) == [[0, 1, 2]]  # equal lengths: one attention call
    assert length_groups([100, 3], 1.25) == [[1], [0]]


def test_pack_lays_out_groups_and_rejects_empty_input() -> None:
    from engine.packing import pack

    flat, packing = pack([[7, 8, 9], [5], [1, 2, 3, 4]], max_padding_ratio=1.0)
    assert packing.order.tolist() == [1, 0, 2]  # by length
    assert flat.tolist() == [5, 7, 8, 9, 1, 2, 3, 4]
    assert packing.starts.tolist() == [0, 1, 4] and packing.lengths.tolist() == [1, 3, 4]
    assert packing.positions.tolist() == [0, 0, 1, 2, 0, 1, 2, 3]
    assert packing.seq_index.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert [(g.start, g.end, g.n, g.t) for g in packing.groups] == [(0, 1, 1, 1), (1, 4, 1, 3), (4, 8, 1, 4)]
    assert all(g.gather is None and g.mask is None for g in packing.groups)  # equal lengths: no padding
    _, loose = pack([[7, 8, 9], [5], [1, 2, 3, 4]], max_padding_ratio=10.0)
    (group,) = loose.groups
    assert (group.n, group.t) == (3, 4)
    assert group.gather.tolist() == [0, 0, 0, 0, 1, 2, 3, 1, 4, 5, 6, 7]  # padding repeats a sequence's first row
    assert group.scatter.tolist() == [0, 4, 5, 6, 8, 9, 10, 11]
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError):
            pack(bad)


def test_embed_pooling_and_normalisation_options() -> None:
    model = tiny_model("bert")
    ids, mask = random_batch([6, 3])
    with torch.inference_mode():
        hidden = model(ids, mask)
        raw = model.embed(ids, mask, normalize=False)
        unit = model.embed(ids, mask)
    torch.testing.assert_close(raw[1], hidden[1, :3].mean(0))
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2))
    model.config.pooling = "cls"
    with torch.inference_mode():
        torch.testing.assert_close(model.embed(ids, mask, normalize=False), hidden[:, 0])


def test_metrics_and_controls() -> None:
    fff_model = tiny_model("bert", trees=2, depth=3)
    assert fff_model.neurons_per_token() == [(8, 64), (8, 64)]
    assert fff_model.tree_shape() == (2, 3)
    dense = tiny_model("crammed", ffn="dense")
    assert dense.neurons_per_token() == [(64, 64)] * 2 and dense.tree_shape() is None
    none = tiny_model("bert", ffn="none")
    assert none.neurons_per_token() == [(0, 64)] * 2
    assert none.last_leaves() is None
    ids, mask = random_batch([4])
    with pytest.raises(ValueError, match="no classification head"):
        fff_model.classify(ids, mask)
    with pytest.raises(ValueError):
        fff_model.set_ffn_impl("nope")
    fff_model.set_record_leaves(False)
    with torch.inference_mode():
        fff_model(ids, mask)
    assert fff_model.last_leaves() is None


def test_training_mode_is_differentiable() -> None:
    model = tiny_model("crammed", labels=["x", "y"]).train()
    ids, mask = random_batch([5, 3])
    loss = model.classify(ids, mask).logsumexp(-1).sum()
    loss.backward()
    assert model.layers[0].ffn.linear_in.weight.grad is not None
    assert model.embeddings.position_scale.grad is not None


def test_config_validation_and_json(tmp_path: Path) -> None:
    config = ModelConfig(layout="crammed", labels=["a", "b"], name="x")
    config.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="layout"):
        ModelConfig(layout="gpt")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="unique"):
        ModelConfig(labels=["a", "a"])


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(minilm_dir)


def test_tokenizer_truncates_both_directions_keeping_special_tokens(tokenizer: Tokenizer) -> None:
    text = "one two three four five six seven eight"
    full = tokenizer.encode([text], max_length=512, truncate=False)[0]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert full[0] == cls and full[-1] == sep and len(full) == 10
    right = tokenizer.encode([text], max_length=5, truncate=True)[0]
    left = tokenizer.encode([text], max_length=5, truncate=True, direction="left")[0]
    assert right == [cls] + full[1:4] + [sep]
    assert left == [cls] + full[-4:-1] + [sep]
    assert tokenizer.decode(right) == "one two three"
    assert tokenizer.convert_ids_to_tokens(left) == ["[CLS]", "six", "seven", "eight", "[SEP]"]
    with pytest.raises(InputTooLongError) as info:
        tokenizer.encode(["short", text], max_length=5, truncate=False)
    assert (info.value.index, info.value.n_tokens, info.value.max_length) == (1, 10, 5)


def test_tokenizer_pad_and_vocab_txt_fallback(tokenizer: Tokenizer, minilm_dir: Path, tmp_path: Path) -> None:
    batch = tokenizer.encode(["hello world", "hi"], max_length=16, truncate=False)
    ids, mask = tokenizer.pad(batch)
    assert ids.dtype == torch.long and ids.shape == (2, 4)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]] and ids[1, 3] == tokenizer.pad_token_id
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    from_vocab = Tokenizer.from_folder(tmp_path)
    texts = ["Hello, World! Ünïcode café", "tokenization of unusualwords"]
    assert from_vocab.encode(texts, max_length=64, truncate=False) == tokenizer.encode(
        texts, max_length=64, truncate=False
    )
    assert from_vocab.vocab_size == tokenizer.vocab_size == 30522


def test_tokenizer_is_thread_safe(tokenizer: Tokenizer) -> None:
    texts = [f"sentence number {i} " + "word " * (i % 40) for i in range(64)]
    expected = [
        tokenizer.encode([t], max_length=16 + i % 5, truncate=True, direction="left" if i % 2 else "right")
        for i, t in enumerate(texts)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(
            pool.map(
                lambda it: tokenizer.encode(
                    [it[1]], max_length=16 + it[0] % 5, truncate=True, direction="left" if it[0] % 2 else "right"
                ),
                list(enumerate(texts)) * 4,
            )
        )
    assert got == expected * 4


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


def test_fused_qkv_at_inference_matches_the_three_projections_and_follows_changes() -> None:
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


def test_fused_qkv_follows_the_three_projections() -> None:
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
