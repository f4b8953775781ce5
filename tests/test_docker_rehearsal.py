"""docker/rehearse.py: its Dockerfile reading (continuations, variables, the dockerignore's rules) on small
inputs, and the rehearsal itself on the real docker/Dockerfile: build stage, runtime stage from an empty root,
the service started by the image's entrypoint as the image's user, its HEALTHCHECK, a request, SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from docker_support import REHEARSE_SCRIPT, rehearse

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REHEARSE_SCRIPT


def _need_standin_python() -> None:
    if not any(Path(d, "python3.11").is_file() for d in ("/usr/local/bin", "/usr/bin")):
        pytest.skip("no system python3.11 to stand in for the image's base")


def test_parse_joins_continuations_and_drops_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1.7\nARG A=1\nFROM img:${A} AS build\nRUN one \\\n # inside\n && two\n\nUSER u:g\n"
    )
    got = [(i.name, i.args) for i in rehearse.parse_dockerfile(text)]
    assert got == [("ARG", "A=1"), ("FROM", "img:${A} AS build"), ("RUN", "one  && two"), ("USER", "u:g")]
    with pytest.raises(rehearse.RehearsalError):
        rehearse.parse_dockerfile("FROM x\nRUN a \\\n")


def test_expand_variables() -> None:
    v = {"A": "1", "EMPTY": ""}
    assert rehearse.expand("$A-${A}-${B}-${B:-d}-${EMPTY:-e}", v) == "1-1--d-e"


def test_the_real_dockerignore_lets_sources_and_the_model_through_and_nothing_built() -> None:
    patterns = rehearse.ignore_patterns(ROOT / "docker" / "Dockerfile", ROOT)
    assert patterns
    passes = [
        "pyproject.toml",
        "setup.py",
        "README.md",
        "csrc/cpu/cmm_cpu.cpp",
        "engine/cmm.py",
        "service/app.py",
        "loadtest/cli.py",
        "models/ultrafastbert-minilm-l6/model.safetensors",
    ]
    blocked = [
        "engine/_cmm.cpython-311-x86_64-linux-gnu.so",
        "engine/__pycache__/cmm.cpython-311.pyc",
        "tests/test_cmm.py",
        ".venv/bin/python",
        "runs/k2d7/model/model.safetensors",
        "models/other/x.bin",
        "docker/Dockerfile",
    ]
    assert [p for p in passes if rehearse.excluded(p, patterns)] == []
    assert [p for p in blocked if not rehearse.excluded(p, patterns)] == []


def test_paths_of_the_image_map_into_the_scratch_root(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM python:3.11-slim\nWORKDIR /src\nENV PATH=/opt/venv/bin:$PATH\nRUN rm -rf /var/lib/apt/lists/*\n"
    )
    r = rehearse.Rehearsal(dockerfile, tmp_path, tmp_path / "s", {}, 10.0)
    assert r.image_dirs == {"src", "opt"}
    root = tmp_path / "s" / "root"
    assert r.rewrite("python -m venv /opt/venv && cd /src") == f"python -m venv {root}/opt/venv && cd {root}/src"
    # system paths and URLs stay as they are
    assert r.rewrite("/usr/bin/x http://127.0.0.1:8000/src") == "/usr/bin/x http://127.0.0.1:8000/src"


@pytest.mark.timeout(1500)
def test_rehearsal_of_the_real_dockerfile_builds_and_serves(tmp_path: Path) -> None:
    """The whole image, minus Docker (about 2.5 minutes here: torch install, kernel compile, start-up)."""
    _need_standin_python()
    report_path = tmp_path / "rehearsal.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(report_path)], capture_output=True, text=True, timeout=1400
    )
    report = json.loads(report_path.read_text())
    assert done.returncode == 0 and report["ok"], (report.get("error"), done.stdout[-3000:], done.stderr[-3000:])
    assert report["final_stage"] == "runtime"
    assert report["health"]["passed"]
    assert report["info"]["kernel"]["compiled"], report["info"]
    assert report["info"]["model"] == Settings.model_fields["model"].default.name
    assert report["embedding_dims"] == 384
    assert report["exit_status"] == 0  # SIGTERM, as `docker stop` sends it, drains and exits cleanly
    assert report["user"]["uid"] not in (0, None)
    if os.geteuid() == 0:  # only root can switch to the image's user
        assert report["process_uid"] == report["user"]["uid"] == 10001
    # everything not rehearsed is named: system packages, user creation, the network index
    assert all(
        any(word in s for word in ("apt-get", "groupadd", "useradd", "--index-url")) for s in report["skipped"]
    ), report["skipped"]


def test_unsupported_instructions_are_refused(tmp_path: Path) -> None:
    _need_standin_python()
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nLABEL a=b\nVOLUME /data\n")
    with pytest.raises(rehearse.RehearsalError, match="line 3: VOLUME is not supported"):
        rehearse.Rehearsal(dockerfile, tmp_path, tmp_path / "s", {}, 10.0).run()
