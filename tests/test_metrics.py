"""Prometheus exposition: parses, counters move with traffic, neuron and leaf-evenness metrics are right."""

from __future__ import annotations

import asyncio
import math

import torch
from service_support import make_app, metric, metric_samples, running, tiny_loaded  # noqa: F401

from engine.backend import Task
from engine.batcher import BatchStats
from service.metrics import ServiceMetrics, leaf_evenness


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_metrics_parse_and_move_with_traffic(tiny_loaded) -> None:
    app = make_app(tiny_loaded)
    npt = tiny_loaded.model.neurons_per_token()

    async def main():
        async with running(app) as c:
            r = await c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            before = metric_samples(r.text)
            texts = ["one", "two words", "three words here"]
            tokens = 0
            for t in texts:
                resp = await c.post("/embed", json={"inputs": [t, t + " again"]})
                assert resp.status_code == 200
                tokens += int(resp.headers["x-compute-tokens"])
            await c.post("/classify", json={"inputs": "fine"})
            await c.post("/embed", json={"inputs": []})
            after = metric_samples((await c.get("/metrics")).text)
            return before, after, tokens

    before, after, tokens = run(main())

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("ufb_requests_total", route="/embed", status="200") == 3
    assert delta("ufb_request_duration_seconds_count", route="/embed", status="200") == 3
    assert delta("ufb_requests_total", route="/embed", status="400") == 1
    assert delta("ufb_failures_total", cause="empty") == 1
    assert delta("ufb_inputs_total", task="embed") == 6
    assert delta("ufb_tokens_total", task="embed") == tokens
    assert delta("ufb_input_length_tokens_count", task="embed") == 6
    assert delta("ufb_queue_duration_seconds_count", task="embed") == 3
    assert delta("ufb_tokenization_duration_seconds_count", task="embed") == 3
    assert delta("ufb_batch_size_sum", task="embed") == 6
    assert delta("ufb_batch_inference_duration_seconds_count", task="classify") == 1
    assert delta("ufb_batch_tokens_count", task="embed") >= 1
    classify_tokens = delta("ufb_tokens_total", task="classify")
    for layer, (evaluated, dense) in enumerate(npt):
        assert delta("ufb_ffn_neurons_evaluated_total", layer=str(layer)) == evaluated * (tokens + classify_tokens)
        assert delta("ufb_ffn_neurons_dense_total", layer=str(layer)) == dense * (tokens + classify_tokens)
    assert metric(after, "ufb_ready") == 1
    assert metric(after, "ufb_queue_depth") == 0
    assert metric(after, "ufb_inflight_batches") == 0
    assert ("ufb_cmm_kernel_compiled", ()) in after
    trees = tiny_loaded.config.fff_trees
    for layer in range(tiny_loaded.config.num_layers):
        for tree in range(trees):
            ent = metric(after, "ufb_fff_leaf_entropy_ratio", layer=str(layer), tree=str(tree))
            used = metric(after, "ufb_fff_leaves_used_ratio", layer=str(layer), tree=str(tree))
            assert 0 < ent <= 1 and 0 < used <= 1


def test_each_app_has_its_own_registry(tiny_loaded) -> None:
    a, b = make_app(tiny_loaded), make_app(tiny_loaded)
    assert a.state.metrics.registry is not b.state.metrics.registry


def test_leaf_evenness() -> None:
    even = torch.full((2, 3, 8), 5.0)
    ent, used = leaf_evenness(even)
    assert torch.allclose(ent.double(), torch.ones(2, 3, dtype=torch.float64)) and torch.all(used == 1)
    collapsed = torch.zeros(1, 1, 8)
    collapsed[0, 0, 3] = 100
    ent, used = leaf_evenness(collapsed)
    assert float(ent) == 0 and math.isclose(float(used), 1 / 8)
    half = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    ent, used = leaf_evenness(half)
    assert math.isclose(float(ent), 0.5) and math.isclose(float(used), 0.5)
    ent, used = leaf_evenness(torch.zeros(1, 1, 4))
    assert float(ent) == 0 and float(used) == 0


def test_leaf_counts_decay_towards_recent_traffic() -> None:
    m = ServiceMetrics(half_life_tokens=100)
    m.set_model([(4, 16)], [0], {"name": "t"})

    def batch(counts: list[float], tokens: int) -> BatchStats:
        return BatchStats(
            task=Task.EMBED,
            size=1,
            tokens=tokens,
            inference_s=0.001,
            lengths=[tokens],
            leaf_counts=[torch.tensor([counts])],
        )

    def gauges() -> tuple[float, float]:
        samples = metric_samples(m.exposition().decode())
        return tuple(
            metric(samples, f"ufb_fff_{n}_ratio", layer="0", tree="0") for n in ("leaf_entropy", "leaves_used")
        )

    assert not [k for k in metric_samples(m.exposition().decode()) if k[0].startswith("ufb_fff_")]  # no batch yet
    m.on_batch(batch([100, 0, 0, 0], 100))
    assert gauges() == (0.0, 0.25)
    for _ in range(20):  # 20 half-lives of even traffic wash the collapse out
        m.on_batch(batch([25, 25, 25, 25], 100))
    entropy, used = gauges()
    assert entropy > 0.99 and used == 1
    samples = metric_samples(m.exposition().decode())
    assert metric(samples, "ufb_ffn_neurons_evaluated_total", layer="0") == 4 * 2100
    assert metric(samples, "ufb_ffn_neurons_dense_total", layer="0") == 16 * 2100


def test_layers_with_their_own_tree_counts_save_load_serve_and_report(tmp_path) -> None:
    """A per-layer budget (layer 1: 3 trees, layer 0: 2) survives save and load, and /info and the leaf gauges
    follow each layer's own count."""
    from tiny_models import build_tiny_model

    from engine.checkpoint import load_model

    loaded = load_model(build_tiny_model(tmp_path / "per-layer", trees=2, depth=3, layer_trees={1: 3}))
    assert [f.trees for f in loaded.model.fffs()] == [2, 3]

    async def main():
        async with running(make_app(loaded)) as c:
            assert (await c.post("/embed", json={"inputs": ["one", "two words here"]})).status_code == 200
            return (await c.get("/info")).json(), metric_samples((await c.get("/metrics")).text)

    info, samples = run(main())
    assert info["model"]["fff_trees"] == 2 and info["model"]["fff_layer_trees"] == {"1": 3}
    assert [row["evaluated"] for row in info["neurons_per_token"]["per_layer"]] == [8, 12]
    trees_seen: dict[str, set[str]] = {}
    for name, labels in samples:
        if name == "ufb_fff_leaf_entropy_ratio":
            found = dict(labels)
            trees_seen.setdefault(found["layer"], set()).add(found["tree"])
    assert trees_seen == {"0": {"0", "1"}, "1": {"0", "1", "2"}}
