"""Model and FFF layer: implementations agree, padding is invisible, packing keeps every input, configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import random_batch, tiny_model

from engine.config import ModelConfig
from engine.fff import FFF
from engine.packing import length_groups

torch.set_num_threads(2)


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
@pytest.mark.parametrize("ffn", ["fff", "dense", "none", "hybrid"])
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
@pytest.mark.parametrize("ffn", ["fff", "dense", "none", "hybrid"])
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
    assert fff_model.tree_depth() == 3
    dense = tiny_model("crammed", ffn="dense")
    assert dense.neurons_per_token() == [(64, 64)] * 2 and dense.tree_depth() is None
    hybrid = tiny_model("bert", ffn="hybrid")
    assert hybrid.neurons_per_token() == [(8, 64), (64, 64)] and hybrid.tree_depth() == 3
    assert hybrid.fff_layers() == [0] and len(hybrid.fffs()) == 1
    hybrid.set_record_leaves(True)
    with torch.inference_mode():
        hybrid.embed_ids([[5, 6, 7]])
    leaves = hybrid.last_leaves()
    assert leaves is not None and len(leaves) == 1 and leaves[0].shape == (3, 2)
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
    hybrid = ModelConfig(num_layers=3, dense_ffn_layers=[2, 0])
    assert hybrid.dense_ffn_layers == [2, 0] and [hybrid.ffn_kind(i) for i in range(3)] == ["dense", "fff", "dense"]
    hybrid.save(tmp_path / "h.json")
    assert ModelConfig.load(tmp_path / "h.json") == hybrid
    for bad in ([3], [-1], [1, 1], ["1"], [True], 1):
        with pytest.raises(ValueError, match="dense_ffn_layers must be distinct layer indices in 0..2"):
            ModelConfig(num_layers=3, dense_ffn_layers=bad)
    with pytest.raises(ValueError, match="every layer"):
        ModelConfig(num_layers=2, dense_ffn_layers=[0, 1])
    with pytest.raises(ValueError, match="for FFF models"):
        ModelConfig(ffn="dense", dense_ffn_layers=[0])


def test_per_layer_tree_counts(tmp_path: Path) -> None:
    """``fff_layer_trees``: some FFF layers get another K; JSON keeps its keys as strings and loads them back."""
    config = ModelConfig(num_layers=3, fff_trees=2, fff_depth=3, dense_ffn_layers=[1], fff_layer_trees={2: 5})
    assert [config.trees_in(i) for i in (0, 2)] == [2, 5]
    config.save(tmp_path / "c.json")
    assert '"2": 5' in (tmp_path / "c.json").read_text()
    assert ModelConfig.load(tmp_path / "c.json") == config
    for bad in ({1: 4}, {3: 4}, {0: 0}, {0: True}, {"x": 2}, [2, 2, 2]):
        with pytest.raises(ValueError, match="fff_layer_trees maps FFF layers"):
            ModelConfig(num_layers=3, dense_ffn_layers=[1], fff_layer_trees=bad)
    with pytest.raises(ValueError, match="fff_layer_trees is for FFF models"):
        ModelConfig(ffn="dense", fff_layer_trees={0: 2})

    model = tiny_model("bert", trees=2, depth=3, layer_trees={1: 3})
    assert [f.trees for f in model.fffs()] == [2, 3]
    assert model.neurons_per_token() == [(8, 64), (12, 64)] and model.tree_depth() == 3
    model.set_record_leaves(True)
    with torch.inference_mode():
        model.embed_ids([[5, 6, 7], [8, 9]])
    leaves = model.last_leaves()
    assert leaves is not None and [tuple(x.shape) for x in leaves] == [(5, 2), (5, 3)]
