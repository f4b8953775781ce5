"""docker/prometheus-tei-rules.yml: TEI's metric names recorded from ours, so TEI dashboards and alerts work
unchanged (issue 25). promtool checks the file; a real Prometheus loads it, scrapes a real server after traffic, and
every recorded series exists with the value of the expression it stands for."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_support import free_port, needs_prometheus, running_prometheus
from service_support import make_app, serve_in_thread, tiny_loaded  # noqa: F401

RULES = Path(__file__).resolve().parent.parent / "docker" / "prometheus-tei-rules.yml"
INFER = "/embed|/embed_all|/predict|/classify|/v1/embeddings|/embeddings|/invocations"


def recorded_names() -> list[str]:
    return [r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_the_rules() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(recorded_names())} rules found" in proc.stdout


def test_rules_cover_teis_metric_names() -> None:
    names = set(recorded_names())
    for family in (
        "te_request_duration",
        "te_request_queue_duration",
        "te_request_tokenization_duration",
        "te_request_inference_duration",
        "te_request_input_length",
        "te_batch_next_size",
        "te_batch_next_tokens",
        "te_embed_duration",
        "te_predict_duration",
    ):
        assert {f"{family}_bucket", f"{family}_sum", f"{family}_count"} <= names, family
    assert {
        "te_request_count",
        "te_request_success",
        "te_request_failure",
        "te_queue_size",
        "te_embed_count",
        "te_embed_success",
        "te_predict_count",
        "te_predict_success",
    } <= names


@needs_prometheus
def test_real_prometheus_records_every_tei_series(tiny_loaded, tmp_path: Path) -> None:
    with serve_in_thread(make_app(tiny_loaded)) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(3):
                assert c.post("/embed", json={"inputs": ["a cat", "a dog"]}).status_code == 200
                assert c.post("/v1/embeddings", json={"input": "a bird"}).status_code == 200
                assert c.post("/predict", json={"inputs": [["great"], ["awful"]]}).status_code == 200
            assert c.post("/embed", json={"inputs": ["x"] * 33}).status_code == 413
            assert c.post("/embed", json={"inputs": ""}).status_code == 400
        prom_port = free_port()
        config = {
            "global": {},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "ufb", "static_configs": [{"targets": [url.split("//")[1]]}]}],
        }
        with running_prometheus(config, prom_port, tmp_path) as base:

            def query(expr: str) -> list[dict]:
                body = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=10).json()
                assert body["status"] == "success", (expr, body)
                return body["data"]["result"]

            deadline = time.monotonic() + 30
            while not query("te_predict_success") and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2.5)  # a few more scrapes and evaluations of the same (now constant) values
            missing = [name for name in recorded_names() if not query(name)]
            assert not missing, missing

            def value(expr: str) -> float:
                (sample,) = query(expr)
                return float(sample["value"][1])

            assert value("te_request_count") == value(f'sum(ufb_requests_total{{route=~"{INFER}"}})') == 11
            assert value("te_request_success") == 9
            assert value('te_request_failure{err="batch_size"}') == 1
            assert value('te_request_failure{err="empty"}') == 1
            assert value("te_embed_count") == value('ufb_inputs_total{task="embed"}') == 9
            assert value("te_predict_count") == 6
            assert value("te_queue_size") == 0
            assert value("sum(te_batch_next_size_count)") == value("sum(ufb_batch_size_count)")
            assert value("te_request_duration_count") == 9
            assert 0 < value("histogram_quantile(0.5, te_request_duration_bucket)") < 30
            assert 0 < value("histogram_quantile(0.9, te_embed_queue_duration_bucket)") <= 30
