"""``ultrafastbert evaluate MODEL``: the student against its teacher and the FFN-removed ablation.

Checks (all on text the distillation never trained on, see :mod:`engine.training.text_data`):

* ``cos_mean`` / ``cos_p5``: mean and 5th-percentile cosine between a model's sentence embeddings and the
  teacher's, on held-out sentences (held-out Wikipedia articles + Rotten Tomatoes test snippets).
* ``lee_pearson``: Pearson correlation between embedding cosine and human similarity on the 1,225 Lee pairs.
* ``nn_overlap10``: mean overlap of each held-out sentence's 10 nearest neighbours with the teacher's.
* ``probe_acc``: logistic-regression probe on frozen normalised embeddings, Rotten Tomatoes (fixed seeded split).
* ``head_acc``: the fresh/rotten classification head: the model's own shipped head when it has one, else (and
  always for teacher and ablation) the same recipe trained here on the probe's train split.
* ``neurons_per_token``, the mean per layer (of the dense width), and ``sentences_per_s`` (held-out set, batch 64).

``ratio`` = student / teacher, ``gap_closed`` = (student - ablation) / (teacher - ablation), per check.

With a built corpus (``--corpus``, :mod:`engine.training.corpus`), ``registers`` adds, per register, the same
embedding checks on that register's held-out sentences (documents no training run saw, and whole registers kept
out of training): mean and 5th-percentile cosine to the teacher, and the top-10 neighbour overlap among the
register's own sentences, against :data:`REGISTER_TARGETS`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.checkpoint import LoadedModel, convert_hf_bert, load_model

log = logging.getLogger("engine.training.evaluate")

QUALITY_CHECKS = ("cos_mean", "cos_p5", "lee_pearson", "nn_overlap10", "probe_acc", "head_acc")
TARGET_RATIO, TARGET_GAP, TARGET_COS = 0.96, 0.80, 0.90
REGISTER_TARGETS = {"cos_mean": 0.95, "cos_p5": 0.85, "nn_overlap10": 0.70}
PROBE_TARGET_POINTS = 2.0  # the student's cross-domain probe within this many points of the teacher's


def register_sentences(corpus: str | Path, per_register: int, seed: int = 0) -> dict[str, list[str]]:
    """Up to ``per_register`` held-out sentences per register: documents in a seeded order, one sentence from each
    per round, so one long document cannot fill a register."""
    import random

    from engine.training.corpus import heldout_documents, load_report

    by_register: dict[str, list[list[str]]] = {}
    for name, src in sorted(load_report(corpus)["sources"].items()):
        docs = [d for d in heldout_documents(corpus, name)]
        by_register.setdefault(src["register"], []).extend(docs)
    out = {}
    for register, docs in sorted(by_register.items()):
        random.Random(f"{seed}:{register}").shuffle(docs)
        picked: list[str] = []
        depth = 0
        while len(picked) < per_register and any(depth < len(d) for d in docs):
            picked.extend(d[depth] for d in docs if depth < len(d))  # one sentence per document per round
            depth += 1
        out[register] = picked[:per_register]
    return out


def embedding_checks(emb: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean / 5th-percentile cosine of normalised ``emb`` to ``ref`` and the overlap of their top-k neighbours."""
    cos = (emb * ref).sum(-1)
    mine, theirs = _topk(emb, k), _topk(ref, k)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / mine.shape[1] for a, b in zip(mine, theirs)]
    return {
        "cos_mean": float(cos.mean()),
        "cos_p5": float(torch.quantile(cos.double(), 0.05)),
        "nn_overlap10": sum(overlap) / len(overlap),
    }


PROBE_MARGIN = 0.5  # VADER ratings in [-4, 4]: |rating| below this is neutral and left out of the probe
PROBE_TRAIN, PROBE_TEST = 3000, 1500


def domain_probe_data(root: Path, seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """Sentiment across domains from the VADER sets: ``train`` (movie review snippets) and one test set per other
    domain (tweets, Amazon product review snippets, NYT editorial snippets), plus held-out movie snippets."""
    import random

    from engine.training.sources import vader_snippets

    out = {}
    for kind in ("movies", "tweets", "amazon", "nyt"):
        rows = [
            (t, "positive" if v > 0 else "negative") for _, v, t in vader_snippets(root, kind) if abs(v) >= PROBE_MARGIN
        ]
        random.Random(f"{seed}:{kind}").shuffle(rows)
        if kind == "movies":
            out["train"] = ([t for t, _ in rows[:PROBE_TRAIN]], [y for _, y in rows[:PROBE_TRAIN]])
            rows = rows[PROBE_TRAIN:]
        rows = rows[:PROBE_TEST]
        out[kind] = ([t for t, _ in rows], [y for _, y in rows])
    return out


def domain_probe(
    models: dict[str, LoadedModel], data: dict[str, tuple[list[str], list[str]]], seed: int = 0
) -> dict[str, Any]:
    """Per model: a logistic-regression probe on normalised embeddings, fitted on ``train``, accuracy per domain."""
    from engine.training.head import fit_linear_head

    out: dict[str, Any] = {}
    for name, m in models.items():
        x_train = F.normalize(_features(m, data["train"][0])[0], dim=-1)
        _, _, _, predict = fit_linear_head(x_train, data["train"][1], seed)
        out[name] = {}
        for domain, (texts, labels) in data.items():
            if domain != "train":
                preds = predict(F.normalize(_features(m, texts)[0], dim=-1))
                out[name][domain] = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    return out


def register_scores(models: dict[str, LoadedModel], sets: dict[str, list[str]]) -> dict[str, Any]:
    """Per register: every model's embedding checks against the teacher (``models`` must hold ``teacher``)."""
    out: dict[str, Any] = {}
    for register, texts in sets.items():
        embs = {name: F.normalize(_features(m, texts)[0], dim=-1) for name, m in models.items()}
        row: dict[str, Any] = {"sentences": len(texts)}
        for name, emb in embs.items():
            if name != "teacher":
                row[name] = embedding_checks(emb, embs["teacher"])
        out[register] = row
    return out


def _features(loaded: LoadedModel, texts: list[str], max_length: int = 256) -> tuple[torch.Tensor, float]:
    from engine.training.head import pooled_features

    t0 = time.perf_counter()
    feats = pooled_features(loaded, texts, max_length=max_length)
    return feats, time.perf_counter() - t0


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _topk(emb: torch.Tensor, k: int) -> torch.Tensor:
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    return sims.topk(min(k, emb.shape[0] - 1), dim=1).indices


class Data:
    """The evaluation texts, loaded once and shared by every model."""

    def __init__(self, heldout: int, probe_train: int, probe_test: int, texts: dict[str, Any] | None = None) -> None:
        if texts is not None:  # tests pass their own small texts
            self.heldout = texts["heldout"]
            self.lee_docs, self.lee_sims = texts["lee"]
            self.train, self.test = texts["train"], texts["test"]
            return
        from engine.training.text_data import heldout_sentences, lee_documents, rotten_tomatoes

        self.heldout = heldout_sentences(heldout)
        self.lee_docs, self.lee_sims = lee_documents()
        tr, te = rotten_tomatoes("train", probe_train), rotten_tomatoes("test", probe_test)
        self.train, self.test = (tr.texts, tr.labels), (te.texts, te.labels)


def model_scores(
    loaded: LoadedModel, data: Data, teacher_ref: dict[str, Any] | None, *, own_head: bool, seed: int = 0
) -> dict[str, Any]:
    """Scores of one model; ``teacher_ref`` holds the teacher's held-out embeddings and neighbours (None: this
    model is the teacher)."""
    from engine.training.head import fit_linear_head

    loaded.model.eval()
    _features(loaded, data.heldout[:64])  # warm-up (weight packing, kernel load) before the timed pass
    held, secs = _features(loaded, data.heldout)
    held_n = F.normalize(held, dim=-1)
    lee, _ = _features(loaded, list(data.lee_docs))
    lee_n = F.normalize(lee, dim=-1)
    n = lee_n.shape[0]
    iu = torch.triu_indices(n, n, 1)
    lee_cos = (lee_n @ lee_n.T)[iu[0], iu[1]]
    tr, _ = _features(loaded, data.train[0])
    te, _ = _features(loaded, data.test[0])
    # probe: on normalised embeddings (what an embedding user gets)
    _, _, _, predict = fit_linear_head(F.normalize(tr, dim=-1), data.train[1], seed)
    probe_acc = sum(p == t for p, t in zip(predict(F.normalize(te, dim=-1)), data.test[1])) / len(data.test[1])
    # head: the model's own head if asked and present, else the shipped recipe (raw mean-pooled features)
    head_source = "trained here on the probe train split"
    if own_head and loaded.model.head is not None:
        with torch.inference_mode():
            logits = loaded.model.head(te)
        labels = loaded.config.labels or []
        preds = [labels[i] for i in logits.argmax(1).tolist()]
        head_source = "shipped head"
    else:
        _, _, _, predict_raw = fit_linear_head(tr, data.train[1], seed)
        preds = predict_raw(te)
    head_acc = sum(p == t for p, t in zip(preds, data.test[1])) / len(data.test[1])
    ref_emb = held_n if teacher_ref is None else teacher_ref["emb"]
    cos = (held_n * ref_emb).sum(-1)
    k = 10
    mine = _topk(held_n, k)
    ref_nn = mine if teacher_ref is None else teacher_ref["nn"]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / mine.shape[1] for a, b in zip(mine, ref_nn)]
    npt = loaded.model.neurons_per_token()
    return {
        "cos_mean": float(cos.mean()),
        "cos_p5": float(torch.quantile(cos.double(), 0.05)),
        "lee_pearson": _pearson(lee_cos, torch.tensor(data.lee_sims)),
        "nn_overlap10": sum(overlap) / len(overlap),
        "probe_acc": probe_acc,
        "head_acc": head_acc,
        "head_source": head_source,
        "neurons_per_token": round(sum(e for e, _ in npt) / len(npt), 2),  # mean over layers (a hybrid's differ)
        "dense_width": npt[0][1],
        "sentences_per_s": len(data.heldout) / secs,
        "_emb": held_n,
        "_nn": mine,
    }


def evaluate(
    model_path: str | Path,
    teacher: str | Path | None = None,
    *,
    heldout: int = 600,
    probe_train: int = 2000,
    probe_test: int = 1000,
    texts: dict[str, Any] | None = None,
    seed: int = 0,
    corpus: str | Path | None = None,
    per_register: int = 500,
    register_texts: dict[str, list[str]] | None = None,
    probe_data: dict[str, tuple[list[str], list[str]]] | None = None,
) -> dict[str, Any]:
    """The full comparison as a JSON-able dict (see the module docstring)."""
    from engine.training.distill import default_teacher

    teacher_dir = Path(teacher) if teacher else default_teacher()
    data = Data(heldout, probe_train, probe_test, texts)
    models: dict[str, LoadedModel] = {
        "teacher": load_model(teacher_dir),
        "student": load_model(model_path),
        "ablation": convert_hf_bert(teacher_dir, ffn="none"),
    }
    results: dict[str, dict[str, Any]] = {}
    ref = None
    for name in ("teacher", "student", "ablation"):
        t0 = time.perf_counter()
        scores = model_scores(models[name], data, ref, own_head=(name == "student"), seed=seed)
        if name == "teacher":
            ref = {"emb": scores["_emb"], "nn": scores["_nn"]}
        results[name] = {k: v for k, v in scores.items() if not k.startswith("_")}
        log.info("%s evaluated in %.0f s", name, time.perf_counter() - t0)
    sets = (
        register_texts
        if register_texts is not None
        else (register_sentences(corpus, per_register, seed) if corpus else {})
    )
    registers = register_scores(models, sets) if sets else {}
    if probe_data is None and corpus:
        from engine.training.corpus import fetch
        from engine.training.sources import VADER

        probe_data = domain_probe_data(fetch(VADER, Path(corpus) / "cache"), seed)
    probes = domain_probe(models, probe_data, seed) if probe_data else {}
    t, s, a = results["teacher"], results["student"], results["ablation"]
    summary: dict[str, Any] = {}
    if registers:
        worst = {check: min(r["student"][check] for r in registers.values()) for check in REGISTER_TARGETS}
        summary["registers_worst"] = worst
        summary["registers_met"] = all(worst[c] >= REGISTER_TARGETS[c] for c in REGISTER_TARGETS)
    if probes:
        summary["probe_gap_points"] = {
            d: 100 * (probes["student"][d] - probes["teacher"][d]) for d in probes["teacher"]
        }
        summary["probe_met"] = all(g >= -PROBE_TARGET_POINTS for g in summary["probe_gap_points"].values())
    for check in QUALITY_CHECKS:
        ratio = s[check] / t[check] if t[check] else float("nan")
        gap = (s[check] - a[check]) / (t[check] - a[check]) if t[check] != a[check] else float("nan")
        summary[check] = {
            "ratio": ratio,
            "gap_closed": gap,
            "ratio_met": ratio >= TARGET_RATIO,
            "gap_met": gap >= TARGET_GAP,
        }
    summary["cos_mean_met"] = s["cos_mean"] >= TARGET_COS
    summary["neurons_met"] = s["neurons_per_token"] <= 16
    summary["all_met"] = bool(
        summary["cos_mean_met"]
        and summary["neurons_met"]
        and all(summary[c]["ratio_met"] and summary[c]["gap_met"] for c in QUALITY_CHECKS)
    )
    summary["ff_speedup_neurons"] = s["dense_width"] / max(1, s["neurons_per_token"])
    summary["speedup_vs_teacher"] = s["sentences_per_s"] / t["sentences_per_s"]
    cfg, fffs = models["student"].config, models["student"].model.fffs()
    if fffs:  # the kernel against the dense FFN at the student's largest per-layer tree count
        trees = max(f.trees for f in fffs)
        summary["ffn_speedup_measured"] = ffn_speedup(cfg.hidden_size, cfg.intermediate_size, trees, cfg.fff_depth)
    return {
        "model": str(model_path),
        "teacher": str(teacher_dir),
        "data": {
            "heldout_sentences": len(data.heldout),
            "lee_pairs": len(data.lee_sims),
            "probe_train": len(data.train[0]),
            "probe_test": len(data.test[0]),
            "seed": seed,
        },
        "threads": torch.get_num_threads(),
        "results": results,
        "summary": summary,
        "registers": registers,
        "domain_probe": probes,
        "targets": {
            "ratio": TARGET_RATIO,
            "gap_closed": TARGET_GAP,
            "cos_mean": TARGET_COS,
            "max_neurons": 16,
            "registers": REGISTER_TARGETS,
        },
    }


@torch.no_grad()
def ffn_speedup(
    hidden: int, intermediate: int, trees: int, depth: int, tokens: int = 2048, repeats: int = 20, seed: int = 0
) -> dict[str, float]:
    """Feedforward-only timing on random weights: the dense FFN (hidden -> intermediate -> hidden) against the
    FFF kernel with K trees of depth D, on ``tokens`` tokens (best of ``repeats``)."""
    from engine.fff import FFF
    from engine.layers import DenseFFN

    torch.manual_seed(seed)
    x = torch.randn(tokens, hidden)
    dense = DenseFFN(hidden, intermediate, bias=True).eval()
    fff = FFF(hidden, hidden, depth, trees, bias_out=True).eval()

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_dense, t_fff = best(lambda: dense(x)), best(lambda: fff(x))
    return {"dense_ms": t_dense * 1e3, "fff_ms": t_fff * 1e3, "speedup": t_dense / t_fff, "tokens": tokens}


def format_table(report: dict[str, Any]) -> str:
    r, s = report["results"], report["summary"]
    rows: list[tuple[str, ...]] = [("check", "teacher", "student", "ablation", "stud/teach", "gap closed")]
    for check in QUALITY_CHECKS:
        rows.append(
            (
                check,
                f"{r['teacher'][check]:.4f}",
                f"{r['student'][check]:.4f}",
                f"{r['ablation'][check]:.4f}",
                f"{s[check]['ratio']:.3f}",
                f"{s[check]['gap_closed']:.3f}",
            )
        )
    rows.append(
        (
            "neurons/token/layer",
            *(f"{r[m]['neurons_per_token']}/{r[m]['dense_width']}" for m in ("teacher", "student", "ablation")),
            "",
            "",
        )
    )
    rows.append(
        (
            "sentences/s",
            *(f"{r[m]['sentences_per_s']:.1f}" for m in ("teacher", "student", "ablation")),
            f"{s['speedup_vs_teacher']:.2f}x",
            "",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "ffn_speedup_measured" in s:
        f = s["ffn_speedup_measured"]
        lines.append(
            f"feedforward alone ({f['tokens']} tokens): dense {f['dense_ms']:.2f} ms, "
            f"FFF {f['fff_ms']:.2f} ms "
            f"-> {f['speedup']:.1f}x (neuron ratio {s['ff_speedup_neurons']:.0f}x)"
        )
    if report.get("registers"):
        lines.append("")
        head = ("register", "sentences", "cos mean", "cos p5", "overlap@10", "ablation cos mean")
        reg_rows = [head] + [
            (
                name,
                str(r["sentences"]),
                f"{r['student']['cos_mean']:.4f}",
                f"{r['student']['cos_p5']:.4f}",
                f"{r['student']['nn_overlap10']:.4f}",
                f"{r['ablation']['cos_mean']:.4f}" if "ablation" in r else "",
            )
            for name, r in report["registers"].items()
        ]
        w = [max(len(row[i]) for row in reg_rows) for i in range(len(head))]
        lines.extend("  ".join(c.ljust(x) for c, x in zip(row, w)) for row in reg_rows)
        t_ = report["targets"]["registers"]
        lines.append(
            f"held-out registers (cos mean >= {t_['cos_mean']}, p5 >= {t_['cos_p5']}, overlap@10 >= "
            f"{t_['nn_overlap10']} on every register): {'MET' if s['registers_met'] else 'MISSED'}"
        )
    if report.get("domain_probe"):
        p = report["domain_probe"]
        lines.append("")
        lines.append("sentiment probe fitted on movie snippets: accuracy per domain (student - teacher, points)")
        for d in p["teacher"]:
            cells = "  ".join(f"{m} {p[m][d]:.4f}" for m in p)
            lines.append(f"  {d:8s} {cells}  ({s['probe_gap_points'][d]:+.1f})")
        lines.append(
            f"probe within {PROBE_TARGET_POINTS:g} points of the teacher on every domain: "
            f"{'MET' if s['probe_met'] else 'MISSED'}"
        )
    met = "MET" if s["all_met"] else "MISSED"
    lines.append("")
    lines.append(
        f"targets (>= 96 % of teacher and >= 80 % of the ablation gap closed on every check, "
        f"mean cosine >= 0.9, <= 16 neurons): {met}"
    )
    return "\n".join(lines)


def run_cli(args: Any) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate(
        args.model,
        args.teacher,
        heldout=args.heldout,
        probe_train=args.probe_train,
        probe_test=args.probe_test,
        corpus=args.corpus,
        per_register=args.per_register,
    )
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.json_out}")
    return 0
