"""The distillation pipeline and ``evaluate`` on a tiny teacher (hidden 32, 2 layers): a few steps only.

Never runs the real distillation. The tiny teacher is a random Hugging Face ``BertModel`` saved with the MiniLM
tokenizer files, so the whole path (HF folder -> convert -> layer-wise -> end-to-end -> head -> save -> load ->
serve, and evaluate against teacher and ablation) is exercised in seconds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from service_support import metric, metric_samples, running, settings

from engine.checkpoint import convert_hf_bert, load_model
from engine.training.distill import DistillOptions, distill
from service.app import create_app

WORDS = (
    "the film was a quiet triumph of light and memory; every scene felt alive and honest yet the plot "
    "dragged on while the actors seemed lost in a script nobody had finished writing before shooting began "
    "history of the city river bridge market winter summer music science theory numbers war peace"
).split()


def _texts(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=gen))
        idx = torch.randint(0, len(WORDS), (length,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in idx) + ".")
    return out


@pytest.fixture(scope="module")
def tiny_teacher(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("teacher") / "tiny-bert-teacher"
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():  # make the FFNs matter, so the ablation differs from the teacher
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight.mul_(10)
            layer.output.dense.weight.mul_(10)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(minilm_dir / name, folder / name)
    return folder


def _opts(teacher: Path, out: Path, **kw: object) -> DistillOptions:
    texts = _texts(160)
    head = (_texts(40, seed=1), ["fresh" if i % 2 else "rotten" for i in range(40)])
    base = DistillOptions(
        teacher=str(teacher),
        out=str(out),
        trees=2,
        depth=2,
        seed=3,
        layer_steps=12,
        steps=8,
        layer_lr=3e-3,
        lr=1e-3,
        layer_batch_tokens=256,
        batch_size=8,
        max_length=32,
        cache_tokens=2000,
        checkpoint_every=5,
        save_dtype="float32",
        texts=texts,
        head_data=head,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def distilled(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return distill(_opts(tiny_teacher, tmp_path_factory.mktemp("run") / "a"), progress=False)


def test_losses_go_down(distilled: Path) -> None:
    records = [json.loads(line) for line in (distilled.parent / "distill_log.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("done")]
    assert len(done) == 2
    for r in done:  # each FFF got closer to its own FFN
        assert r["rel_err"] < r["rel_err_init"]
    e2e = [r["loss"] for r in records if r["phase"] == "e2e"]
    assert len(e2e) >= 2 and e2e[-1] < e2e[0]


def test_resume_reaches_the_same_state(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    opts = _opts(tiny_teacher, tmp_path / "b")
    distill(opts, progress=False, stop_after_steps=7)  # inside layer 0 (steps are shared out by difficulty)
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    assert not (tmp_path / "b" / "model").exists()
    distill(opts, resume=True, progress=False, stop_after_steps=20)  # lands in the end-to-end phase
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["state"]
    assert state["phase"] == "e2e" and 0 < state["step"] < opts.steps
    final = distill(opts, resume=True, progress=False)
    a, b = load_file(str(distilled / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_result_loads_classifies_and_serves(distilled: Path) -> None:
    loaded = load_model(distilled)
    assert loaded.config.ffn == "fff" and loaded.config.labels == ["fresh", "rotten"]
    assert loaded.model.neurons_per_token()[0] == (2 * 3, 64)
    assert loaded.config.extra["distill"]["trees"] == 2
    assert loaded.config.extra["teacher"] == "tiny-bert-teacher"

    async def go() -> None:
        app = create_app(settings(distilled, warmup=False), loaded)
        async with running(app) as c:
            r = await c.post("/embed", json={"inputs": ["a quiet triumph", "the plot dragged"]})
            assert r.status_code == 200, r.text
            emb = torch.tensor(r.json())
            assert emb.shape == (2, 32)
            assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-4)
            r = await c.post("/classify", json={"inputs": "a quiet triumph"})
            assert r.status_code == 200, r.text
            assert {p["label"] for p in r.json()[0]} == {"fresh", "rotten"}

    asyncio.run(go())


def test_save_dtype_halves_the_file_and_round_trips(distilled: Path, tmp_path: Path) -> None:
    from engine.checkpoint import save_model

    loaded = load_model(distilled)
    save_model(loaded, tmp_path / "h", dtype=torch.float16)
    size = (tmp_path / "h" / "model.safetensors").stat().st_size
    assert size < 0.6 * (distilled / "model.safetensors").stat().st_size
    again = load_model(tmp_path / "h")
    assert all(v.dtype == torch.float32 for v in again.model.state_dict().values())
    save_model(again, tmp_path / "h2", dtype=torch.float16)
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("h", "h2"))
    assert first.keys() == second.keys()
    assert all(first[k].dtype == torch.float16 and torch.equal(first[k], second[k]) for k in first)


def test_evaluate_on_a_tiny_model(distilled: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    from engine.training.evaluate import QUALITY_CHECKS, evaluate, format_table

    docs = _texts(8, seed=5)
    sims = [float(i % 3) / 2 for i in range(8 * 7 // 2)]
    texts = {
        "heldout": _texts(30, seed=4),
        "lee": (docs, sims),
        "train": (_texts(40, seed=6), ["fresh" if i % 3 else "rotten" for i in range(40)]),
        "test": (_texts(20, seed=7), ["fresh" if i % 3 else "rotten" for i in range(20)]),
    }
    report = evaluate(distilled, tiny_teacher, texts=texts)
    r = report["results"]
    assert r["teacher"]["cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["teacher"]["nn_overlap10"] == pytest.approx(1.0)
    assert r["student"]["neurons_per_token"] == 6 and r["ablation"]["neurons_per_token"] == 0
    assert r["teacher"]["neurons_per_token"] == 64
    assert r["student"]["head_source"] == "shipped head"
    for model in ("student", "ablation"):
        for check in QUALITY_CHECKS:
            assert -1.0 <= r[model][check] <= 1.0
    assert set(report["summary"]) >= set(QUALITY_CHECKS) | {"all_met", "cos_mean_met"}
    table = format_table(report)
    assert "cos_mean" in table and "sentences/s" in table
    json.dumps(report)  # JSON-able
    assert report["registers"] == {}


def test_evaluate_per_register(distilled: Path, tiny_teacher: Path) -> None:
    """Each register's held-out sentences get the embedding checks: the teacher is its own reference and the
    FFN-removed ablation scores below the student on a register it was distilled on."""
    from engine.training.evaluate import REGISTER_TARGETS, evaluate, format_table

    docs = _texts(8, seed=5)
    sims = [float(i % 3) / 2 for i in range(8 * 7 // 2)]
    texts = {
        "heldout": _texts(12, seed=4),
        "lee": (docs, sims),
        "train": (_texts(20, seed=6), ["fresh" if i % 3 else "rotten" for i in range(20)]),
        "test": (_texts(10, seed=7), ["fresh" if i % 3 else "rotten" for i in range(10)]),
    }
    sets = {
        "movies": _texts(30, seed=8),
        "other": [f"question {i}: where is the {w}?" for i, w in enumerate(WORDS[:25])],
    }
    labels = ["positive" if i % 2 else "negative" for i in range(30)]
    probe = {"train": (_texts(30, seed=12), labels), "tweets": (_texts(30, seed=13), labels[::-1])}
    report = evaluate(distilled, tiny_teacher, texts=texts, register_texts=sets, probe_data=probe)
    p = report["domain_probe"]
    assert set(p) == {"teacher", "student", "ablation"} and all(set(v) == {"tweets"} for v in p.values())
    assert all(0 <= v["tweets"] <= 1 for v in p.values())
    assert report["summary"]["probe_gap_points"]["tweets"] == pytest.approx(
        100 * (p["student"]["tweets"] - p["teacher"]["tweets"])
    )
    assert "sentiment probe" in format_table(report)
    regs = report["registers"]
    assert set(regs) == {"movies", "other"} and regs["movies"]["sentences"] == 30
    for r in regs.values():
        assert set(r) == {"sentences", "student", "ablation"}
        for model in ("student", "ablation"):
            assert set(r[model]) == set(REGISTER_TARGETS)
            assert -1 <= r[model]["cos_p5"] <= r[model]["cos_mean"] <= 1 and 0 <= r[model]["nn_overlap10"] <= 1
    assert regs["movies"]["student"]["cos_mean"] > regs["movies"]["ablation"]["cos_mean"]
    worst = report["summary"]["registers_worst"]
    assert worst["cos_mean"] == min(r["student"]["cos_mean"] for r in regs.values())
    assert report["summary"]["registers_met"] is False
    assert "held-out registers" in format_table(report) and "MISSED" in format_table(report)


def test_register_sentences_spread_over_documents(tmp_path: Path) -> None:
    from engine.training.corpus import REPORT_FILE
    from engine.training.evaluate import register_sentences

    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "a.txt").write_text(
        "".join("".join(f"a{d}s{i}\n" for i in range(50)) + "\n" for d in range(3))
    )
    (tmp_path / "heldout" / "b.txt").write_text("b0s0\nb0s1\n\n")
    (tmp_path / REPORT_FILE).write_text(json.dumps({"sources": {"a": {"register": "r1"}, "b": {"register": "r2"}}}))
    sets = register_sentences(tmp_path, 6, seed=1)
    assert sets["r2"] == ["b0s0", "b0s1"]
    assert len(sets["r1"]) == 6 and {s[:2] for s in sets["r1"]} == {"a0", "a1", "a2"}  # two from each document
    assert sets == register_sentences(tmp_path, 6, seed=1)


def test_grow_keeps_the_earlier_trees_and_fits_the_added_ones(
    tiny_teacher: Path, distilled: Path, tmp_path: Path
) -> None:
    """``grow_from``: the grown student starts as the earlier one (added trees' output rows at zero), the added
    trees are then fitted to what the earlier trees miss (every layer's error goes down), and end-to-end training
    follows; an interrupted grown run resumes to the same state."""
    from engine.checkpoint import convert_hf_bert
    from engine.training.warm_start import grow_from_student

    earlier = load_model(distilled)
    grown = convert_hf_bert(tiny_teacher, trees=4, depth=2, name="g")
    state: dict = {}
    grow_from_student(grown, distilled, state)
    assert state["phase"] == "grow" and state["grown_from"]["trees"] == {0: 2, 1: 2}
    ids = earlier.tokenizer.encode(_texts(6, seed=9), max_length=64, truncate=True)
    for a, b in zip(earlier.model.pooled_ids(ids, cls=False), grown.model.pooled_ids(ids, cls=False)):
        assert torch.allclose(a, b, atol=1e-5)
    opts = _opts(tiny_teacher, tmp_path / "g", trees=4, grow_from=str(distilled), steps=4)
    whole = distill(opts, progress=False)
    log = [json.loads(line) for line in (tmp_path / "g" / "distill_log.jsonl").read_text().splitlines()]
    fit = [r for r in log if r["phase"] == "grow"]
    assert len(fit) == 1 and all(a < b for a, b in zip(fit[0]["rel_err_after"], fit[0]["rel_err_before"]))
    assert [r["phase"] for r in log[1:]] == ["e2e"] * (len(log) - 1)
    assert load_model(whole).model.neurons_per_token()[0] == (4 * 3, 64)
    opts2 = _opts(tiny_teacher, tmp_path / "g2", trees=4, grow_from=str(distilled), steps=4)
    distill(opts2, progress=False, stop_after_steps=2)
    cut = distill(opts2, resume=True, progress=False)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="fewer trees than K=2; found ffn=fff, K=2"):
        distill(_opts(tiny_teacher, tmp_path / "g3", trees=2, grow_from=str(distilled)), progress=False)


def test_distill_from_a_built_corpus(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    """A corpus folder as ``corpus``: batches stream from its token store; the run resumes exactly."""
    from engine.training import corpus as C

    def docs(_root: Path):  # type: ignore[no-untyped-def]
        for i, t in enumerate(_texts(120, seed=11)):
            yield str(i // 4), t

    src = C.Source("made-up", "reviews", C.Package("pypi", "none", "0"), "test", docs)
    C.build(tmp_path / "corpus", [src], tiny_teacher, roots={"made-up": tmp_path})
    kw = {"init_student": str(distilled), "steps": 4, "corpus": str(tmp_path / "corpus"), "texts": None}
    whole = distill(_opts(tiny_teacher, tmp_path / "k1", **kw), progress=False)
    opts = _opts(tiny_teacher, tmp_path / "k2", **kw)
    distill(opts, progress=False, stop_after_steps=2)
    cut = distill(opts, resume=True, progress=False)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(whole).config.extra["distill"]["corpus"] == str(tmp_path / "corpus")


def test_cli_registers_distill_and_evaluate() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["distill", "--trees", "4", "--depth", "3", "--time-budget", "5", "--resume"])
    assert (args.trees, args.depth, args.time_budget, args.resume) == (4, 3, 5.0, True)
    args = build_parser().parse_args(["evaluate", "some/model", "--json", "out.json"])
    assert args.model == "some/model" and args.json_out == "out.json"


def test_cli_defaults_match_distill_options() -> None:
    """The parser repeats DistillOptions' defaults (to stay free of heavy imports); this keeps the copies equal."""
    from service.cli import build_parser

    args = build_parser().parse_args(["distill"])
    defaults = DistillOptions()
    pairs = {
        "out": "out",
        "trees": "trees",
        "depth": "depth",
        "seed": "seed",
        "time_budget": "time_budget_min",
        "layerwise_share": "layerwise_share",
        "layer_steps": "layer_steps",
        "steps": "steps",
        "layer_lr": "layer_lr",
        "lr": "lr",
        "layer_batch_tokens": "layer_batch_tokens",
        "batch_size": "batch_size",
        "max_length": "max_length",
        "cache_tokens": "cache_tokens",
        "head_train_size": "head_train_size",
        "save_dtype": "save_dtype",
        "teacher": "teacher",
        "hidden_weight": "hidden_weight",
        "embed_weight": "embed_weight",
        "relation_weight": "relation_weight",
        "sampling": "sampling",
        "token_noise": "token_noise",
        "corpus": "corpus",
        "routing_tau": "routing_tau",
        "grow_from": "grow_from",
        "register_weighting": "register_weighting",
        "init_student": "init_student",
        "dense_layers": "dense_layers",
    }
    for arg, field_name in pairs.items():
        assert getattr(args, arg) == getattr(defaults, field_name), arg
    assert build_parser().parse_args(["distill", "--dense-layers", "3,4"]).dense_layers == [3, 4]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--dense-layers", "three"])


def test_init_student_continues_end_to_end_only(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    """``init_student`` starts from an earlier student's weights and skips the layer-wise phase."""
    opts = _opts(tiny_teacher, tmp_path / "c", init_student=str(distilled), steps=3)
    distill(opts, progress=False, stop_after_steps=1)
    payload = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert payload["state"]["phase"] == "e2e" and payload["state"]["step"] == 1
    log = [json.loads(line) for line in (tmp_path / "c" / "distill_log.jsonl").read_text().splitlines()]
    assert log and all(r["phase"] == "e2e" for r in log)
    earlier = load_file(str(distilled / "model.safetensors"))
    for name in ("layers.0.ffn.linear_in.weight", "layers.1.attention.query.weight"):
        moved = (payload["model"][name] - earlier[name]).abs().max().item()
        assert 0 < moved < 2 * opts.lr, name  # one Adam step (each weight moves at most ~lr) off the earlier ones


def test_fresh_windows_and_token_noise_resume_to_the_same_state(
    tiny_teacher: Path, distilled: Path, tmp_path: Path
) -> None:
    """End-to-end batches built afresh each step (``sampling="windows"``, ``token_noise``) are drawn from the step's
    own generator, so an interrupted run ends where an uninterrupted one does; the options reach the saved config."""
    kw = {"init_student": str(distilled), "steps": 4, "sampling": "windows", "token_noise": 0.2}
    whole = distill(_opts(tiny_teacher, tmp_path / "w1", **kw), progress=False)
    opts = _opts(tiny_teacher, tmp_path / "w2", **kw)
    distill(opts, progress=False, stop_after_steps=2)
    cut = distill(opts, resume=True, progress=False)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fixed = distill(_opts(tiny_teacher, tmp_path / "w3", init_student=str(distilled), steps=4), progress=False)
    c = load_file(str(fixed / "model.safetensors"))
    assert not torch.equal(a["layers.0.attention.query.weight"], c["layers.0.attention.query.weight"])
    saved = load_model(whole).config.extra["distill"]
    assert (saved["sampling"], saved["token_noise"]) == ("windows", 0.2)


def test_relation_loss_sees_only_how_sentences_sit_relative_to_each_other() -> None:
    from engine.training.targets import relation_loss

    torch.manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert relation_loss(teacher, teacher) == 0
    # every embedding moved (cosine to its teacher far from 1), their pairwise similarities kept: no loss
    assert (teacher @ rotation * teacher).sum(-1).max() < 0.9
    assert relation_loss(teacher @ rotation, teacher) < 1e-12
    shuffled = teacher[torch.tensor([1, 0, 2, 3, 5, 4])]
    expected = ((shuffled @ shuffled.T - teacher @ teacher.T)[~torch.eye(6, dtype=torch.bool)] ** 2).mean()
    assert torch.allclose(relation_loss(shuffled, teacher), expected) and expected > 0
    assert relation_loss(teacher[:1], teacher[:1]) == 0  # a batch of one has no pairs


def test_relation_weight_adds_the_relation_term(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    opts = _opts(tiny_teacher, tmp_path / "r", init_student=str(distilled), steps=2, relation_weight=5.0)
    distill(opts, progress=False, stop_after_steps=1)
    record = json.loads((tmp_path / "r" / "distill_log.jsonl").read_text().splitlines()[0])
    assert record["relation_mse"] > 0
    weights = opts.hidden_weight * record["hidden_mse"] + opts.embed_weight * (1 - record["emb_cos"])
    assert record["loss"] == pytest.approx(weights + 5.0 * record["relation_mse"], rel=1e-5)


def test_zero_trees_trains_the_no_feedforward_control(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    """``trees=0``: the teacher with its FFNs removed, trained end to end only (what the FFF layers are measured
    against); it saves, loads and embeds like any student, and can be continued with ``init_student``."""
    final = distill(_opts(tiny_teacher, tmp_path / "z", trees=0, steps=4), progress=False)
    log = [json.loads(line) for line in (tmp_path / "z" / "distill_log.jsonl").read_text().splitlines()]
    assert log and all(r["phase"] == "e2e" for r in log)
    loaded = load_model(final)
    assert loaded.config.ffn == "none" and loaded.model.fffs() == []
    assert loaded.model.neurons_per_token()[0][0] == 0
    teacher = load_model(tiny_teacher)
    moved = loaded.model.layers[0].attention.query.weight - teacher.model.layers[0].attention.query.weight
    assert moved.abs().max() > 0  # attention was trained
    ids = [loaded.tokenizer.encode(["a quiet film"], max_length=32, truncate=True)[0]]
    assert torch.isfinite(loaded.model.embed_ids(ids)).all()
    distill(_opts(tiny_teacher, tmp_path / "z2", trees=0, steps=2, init_student=str(final)), progress=False)
    with pytest.raises(ValueError, match="expected a student with ffn=none; found ffn=fff"):
        distill(_opts(tiny_teacher, tmp_path / "z3", trees=0, init_student=str(distilled)), progress=False)


def test_hybrid_keeps_the_teacher_ffn_in_its_dense_layers(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    """``dense_layers``: those layers start as the teacher's own FFN and are trained end to end with the rest; only
    the FFF layers have a layer-wise phase; an all-FFF student can be continued as a hybrid, not the reverse."""
    teacher = convert_hf_bert(tiny_teacher, ffn="dense").model.state_dict()
    final = distill(_opts(tiny_teacher, tmp_path / "h", dense_layers=[1], steps=4), progress=False)
    log = [json.loads(line) for line in (tmp_path / "h" / "distill_log.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in log if r.get("done")] == [0]
    loaded = load_model(final)
    assert loaded.config.dense_ffn_layers == [1] and loaded.model.fff_layers() == [0]
    assert loaded.model.neurons_per_token() == [(2 * 3, 64), (64, 64)]
    trained = loaded.model.state_dict()["layers.1.ffn.dense_in.weight"]
    assert 0 < (trained - teacher["layers.1.ffn.dense_in.weight"]).abs().max() < 4 * 2 * 1e-3  # 4 Adam steps

    async def serve() -> None:  # /info names the dense layer; leaf gauges carry the FFF layer's own index
        async with running(create_app(settings(final, warmup=False), loaded)) as c:
            r = await c.post("/embed", json={"inputs": ["a quiet triumph of light"]})
            assert r.status_code == 200, r.text
            info = (await c.get("/info")).json()
            assert info["model"]["dense_ffn_layers"] == [1]
            assert [x["evaluated"] for x in info["neurons_per_token"]["per_layer"]] == [6, 64]
            samples = metric_samples((await c.get("/metrics")).text)
            tokens = metric(samples, "ufb_tokens_total", task="embed")
            assert tokens > 0
            assert metric(samples, "ufb_ffn_neurons_evaluated_total", layer="1") == 64 * tokens
            layers = {dict(k[1]).get("layer") for k in samples if k[0] == "ufb_fff_leaves_used_ratio"}
            assert layers == {"0"}

    asyncio.run(serve())

    opts = _opts(tiny_teacher, tmp_path / "h2", init_student=str(distilled), dense_layers=[1], steps=3)
    distill(opts, progress=False, stop_after_steps=1)
    weights = torch.load(tmp_path / "h2" / "checkpoint.pt", weights_only=False)["model"]
    earlier = load_file(str(distilled / "model.safetensors"))
    moved = (weights["layers.1.ffn.dense_in.weight"] - teacher["layers.1.ffn.dense_in.weight"]).abs().max()
    assert 0 < moved < 2 * opts.lr  # one step off the teacher's FFN
    moved = (weights["layers.0.ffn.linear_in.weight"] - earlier["layers.0.ffn.linear_in.weight"]).abs().max()
    assert 0 < moved < 2 * opts.lr  # one step off the earlier student's tree
    with pytest.raises(ValueError, match=r"found ffn=fff, K=2, D=2, dense layers \[1\]"):
        distill(_opts(tiny_teacher, tmp_path / "h3", init_student=str(final)), progress=False)
    with pytest.raises(ValueError, match=r"dense_layers \[2\]: the teacher has layers 0..1"):
        distill(_opts(tiny_teacher, tmp_path / "h5", dense_layers=[2]), progress=False)
    with pytest.raises(ValueError, match="trees=0 control"):
        distill(_opts(tiny_teacher, tmp_path / "h4", trees=0, dense_layers=[1]), progress=False)


def test_cli_names_options_that_cannot_work_without_a_traceback(
    tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    base = ["distill", "--teacher", str(tiny_teacher), "--trees", "2", "--depth", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a"), "--dense-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "ultrafastbert distill: error: dense_layers [2]: the teacher has layers 0..1" in err
    assert "Traceback" not in err
    assert main([*base, "--out", str(tmp_path / "b"), "--trees", "-1"]) == 2
    assert "--trees must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a folder holding a run is continued with --resume, never silently started over
    run = tmp_path / "c"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run")
    (run / "distill_log.jsonl").write_text("{}\n")
    assert main([*base, "--out", str(run)]) == 2
    assert f"{run} already holds a run (checkpoint.pt): pass --resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == b"a run" and (run / "distill_log.jsonl").read_text() == "{}\n"


def test_init_student_rejects_another_shape(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="K=4, D=1"):
        distill(_opts(tiny_teacher, tmp_path / "d", init_student=str(distilled), trees=4, depth=1), progress=False)
    per_layer = _opts(tiny_teacher, tmp_path / "f", init_student=str(distilled), trees_per_layer={1: 3})
    with pytest.raises(ValueError, match=r"expected an FFF student with K=\{0: 2, 1: 3\}, D=2; found ffn=fff, K=2"):
        distill(per_layer, progress=False)
    with pytest.raises(ValueError, match="needs an FFF layer"):
        distill(_opts(tiny_teacher, tmp_path / "h", dense_layers=[1], trees_per_layer={1: 3}), progress=False)
    both = _opts(tiny_teacher, tmp_path / "e", init_student=str(distilled), grow_from=str(distilled), trees=4)
    with pytest.raises(ValueError, match="alternatives"):
        distill(both, progress=False)
    assert not (tmp_path / "e").exists()  # refused before the run folder is made


def test_linear_head_ignores_constant_features() -> None:
    """A dead hidden dimension (spread ~1e-6) gets weight 0 instead of a huge folded weight; the live ones still
    separate the classes."""
    from engine.training.head import fit_linear_head

    gen = torch.Generator().manual_seed(0)
    n = 400
    labels = ["fresh" if i % 2 else "rotten" for i in range(n)]
    signal = torch.tensor([1.0 if lab == "fresh" else -1.0 for lab in labels])
    feats = torch.randn(n, 6, generator=gen) * 0.2
    feats[:, 0] += 0.3 * signal
    feats[:, 3] = 0.5 + 1e-6 * torch.randn(n, generator=gen)  # dead: constant plus rounding noise
    classes, weight, bias, predict = fit_linear_head(feats, labels)
    assert classes == ["fresh", "rotten"]
    assert torch.all(weight[:, 3] == 0)
    assert weight.abs().max() < 100 and torch.isfinite(bias).all()
    assert sum(p == t for p, t in zip(predict(feats), labels)) / n > 0.9


def test_closed_form_layer_fit(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    final = distill(_opts(tiny_teacher, tmp_path / "fit", layer_init="fit", refit_out=True, steps=2), progress=False)
    extra = load_model(final).config.extra
    assert extra["distill"]["layer_init"] == "fit" and extra["distill"]["refit_out"] is True
    teacher_init = load_model(distilled).config.extra["layer_errors_init"]
    # before any step, the fitted layers are already closer to their FFNs than the teacher-neuron initialisation
    assert all(f < t for f, t in zip(extra["layer_errors_init"], teacher_init)), (
        extra["layer_errors_init"],
        teacher_init,
    )
    with pytest.raises(ValueError, match="layer_init"):
        distill(_opts(tiny_teacher, tmp_path / "bad", layer_init="pca"), progress=False)


def test_a_pause_does_not_spend_the_time_budget(
    tiny_teacher: Path, distilled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped for a while (``kill -STOP`` while a benchmark runs) neither ends early nor anneals its learning
    rate over the pause: the clock jumps 1000 s before the third step of a run with a 5-minute budget."""
    import engine.training.distill as distill_module

    real, offset, calls = distill_module.time.monotonic, [0.0], [0]
    monkeypatch.setattr(distill_module.time, "monotonic", lambda: real() + offset[0])
    count_step = distill_module._Run.count_step

    def paused_before_third(run: distill_module._Run) -> None:
        calls[0] += 1
        if calls[0] == 3:
            offset[0] += 1000.0
        count_step(run)

    monkeypatch.setattr(distill_module._Run, "count_step", paused_before_third)
    opts = _opts(tiny_teacher, tmp_path / "p", init_student=str(distilled), steps=6, time_budget_min=5.0)
    final = distill(opts, progress=False)
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)["state"]
    assert state["step"] == 6 and state["elapsed_s"] < distill_module.PAUSE_GAP_S
    last = json.loads((tmp_path / "p" / "distill_log.jsonl").read_text().splitlines()[-1])
    # the schedule stands where its step says (the time fraction is tiny); a counted pause would be at the 5 % floor
    assert last["step"] == 5 and last["lr"] == pytest.approx(distill_module._cosine_lr(opts.lr, 5, 6, 1))
    assert (final / "model.safetensors").is_file()


def test_the_packaged_teacher_is_recorded_by_its_name(minilm_dir: Path, tmp_path: Path) -> None:
    """The packaged all-MiniLM-L6-v2 lives in a folder called ``model``; a student's config names the model."""
    from engine.training.distill import DEFAULT_TEACHER_NAME, default_teacher, teacher_name

    assert teacher_name(default_teacher()) == DEFAULT_TEACHER_NAME == "all-MiniLM-L6-v2"
    assert teacher_name(tmp_path / "my-bert") == "my-bert"


def test_a_per_layer_budget_grows_only_the_layers_it_names(tiny_teacher: Path, distilled: Path, tmp_path: Path) -> None:
    """``--trees-per-layer 1:3`` from a K=2 student: layer 1 gains a tree (fitted, then trained), layer 0 keeps K=2;
    the saved student records the budget and serves each layer's own neuron count."""
    from service.cli import build_parser

    args = build_parser().parse_args(["distill", "--trees", "2", "--trees-per-layer", "1:3"])
    assert args.trees_per_layer == {1: 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--trees-per-layer", "1=3"])
    opts = _opts(tiny_teacher, tmp_path / "p", grow_from=str(distilled), trees_per_layer={1: 3}, steps=2)
    final = load_model(distill(opts, progress=False))
    assert final.config.fff_trees == 2 and final.config.fff_layer_trees == {1: 3}
    assert final.model.neurons_per_token() == [(2 * 3, 64), (3 * 3, 64)]
    grow = [json.loads(line) for line in (tmp_path / "p" / "distill_log.jsonl").read_text().splitlines()][0]
    assert grow["phase"] == "grow"
    assert grow["rel_err_after"][0] == pytest.approx(grow["rel_err_before"][0])  # nothing added to layer 0
    assert grow["rel_err_after"][1] < grow["rel_err_before"][1]
