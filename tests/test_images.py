"""docker/Dockerfile and docker/ray/Dockerfile built for real with podman (on local Debian bases: see
tests/image_support.py), then what each image holds run as the image runs it:

* the service image: its ENTRYPOINT starts as its (numeric, non-root) USER, in its WORKDIR, with its ENV only, as
  PID 1; its HEALTHCHECK command passes; /ready turns 200; /info reports the compiled kernel; /v1/embeddings
  answers; SIGTERM (what ``docker stop`` sends) ends it with status 0; and the installed package and model are
  exactly the repository's files (the dockerignore let everything through, and nothing else);
* the Ray image (no entrypoint: KubeRay runs ``ray start``): as user ray, ``ultrafastbert serve --ray`` starts a local
  Ray instance, reports the compiled kernel, answers an embedding, and SIGTERM ends it with status 0;
* each Dockerfile's dockerignore, as podman's builder applies it, sends the files its COPY lines need (every one
  the repository has there) and nothing else: no compiled module, bytecode, tests or virtual environment.

First run on a machine: about 20 minutes (debootstrap, apt, pip, two kernel compiles); then podman's layer cache and
the kept base images make it a few seconds unless the sources or the lock files change. Skipped, with the reason,
only where podman or debootstrap is missing or cannot build (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import image_support as images
import pytest

from service.settings import Settings

ROOT = images.ROOT
DOCKER = ROOT / "docker"
SERVICE_TAG = "localhost/ultrafastbert-serve:test"
RAY_TAG = "localhost/ultrafastbert-serve-ray:test"
START_TIMEOUT_S = 300
# What each Dockerfile's COPY lines take from the repository (the dockerignore must let all of it through).
COPIED = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "csrc",
    "engine",
    "service",
    "loadtest",
    "models/ultrafastbert-minilm-l6",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_tools() -> None:
    missing = images.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs podman and debootstrap with apt-get)")
    probe = subprocess.run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def build_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images") / "build.log"


@pytest.fixture(scope="module")
def debian_base(build_log: Path) -> str:
    _need_tools()
    return images.debian_base(build_log)


@pytest.fixture(scope="module")
def build_args() -> dict[str, str]:
    # torch from the index this machine's pip uses (it finds the CPU wheel there); the Dockerfiles' default stays
    # the PyTorch CPU index
    return {"TORCH_INDEX_URL": images.pip_config()[2]}


def _url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def _get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _embed(port: int, path: str = "/v1/embeddings") -> list[float]:
    body = json.dumps({"input": ["an image built for real"]}).encode()
    req = urllib.request.Request(_url(port, path), body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["data"][0]["embedding"]


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before ready:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(_url(port, "/ready"), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"/ready not 200 within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _assert_runs_as(proc: subprocess.Popen, who: images.Identity) -> None:
    """The container's PID 1 runs with the image's user and group."""
    status = Path(f"/proc/{images.namespace_init(proc.pid)}/status").read_text()
    assert f"Uid:\t{who.uid}\t" in status and f"Gid:\t{who.gid}\t" in status, status


def _files(top: Path, suffixes: tuple[str, ...] = ()) -> set[str]:
    return {
        p.relative_to(top).as_posix()
        for p in top.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (not suffixes or p.suffix in suffixes)
    }


@pytest.mark.parametrize("dockerfile", [DOCKER / "Dockerfile", DOCKER / "ray" / "Dockerfile"], ids=["service", "ray"])
def test_dockerignore_sends_what_the_image_copies_and_nothing_else(dockerfile: Path) -> None:
    _need_tools()
    lock = dockerfile.parent.relative_to(ROOT) / "requirements.lock"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *COPIED, str(lock)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    sent = images.context_files(ROOT, dockerfile.with_name("Dockerfile.dockerignore"))
    assert sent == set(listed), (sorted(sent - set(listed))[:20], sorted(set(listed) - sent)[:20])


@pytest.mark.timeout(3600)
def test_service_image_builds_and_serves_as_its_user(
    debian_base: str, build_args: dict[str, str], build_log: Path, tmp_path: Path
) -> None:
    images.build(
        DOCKER / "Dockerfile",
        ROOT,
        SERVICE_TAG,
        {"PYTHON_IMAGE": debian_base, **build_args},
        build_log,
        ignorefile=DOCKER / "Dockerfile.dockerignore",
    )
    cfg = images.config(SERVICE_TAG)
    user = cfg["User"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", f"USER must be a non-root uid: {user}"
    assert cfg["Healthcheck"]["Test"][0] == "CMD", cfg.get("Healthcheck")
    assert cfg["Entrypoint"] == ["ultrafastbert", "serve"]
    port = _free_port()  # `docker run -p` would map the image's port; here the service binds a free one directly
    env = images.image_env(cfg, UFB_PORT=str(port))
    assert f"{images.image_env(cfg)['UFB_PORT']}/tcp" in cfg["ExposedPorts"]
    with images.container_root(SERVICE_TAG) as root:
        who = images.resolve_user(root, user)
        # the installed package is the repository's, file for file (the dockerignore let all of it through)
        site = next((root / "opt/venv/lib").glob("python3*/site-packages"))
        for pkg in ("engine", "service", "loadtest"):
            assert _files(site / pkg, (".py",)) == _files(ROOT / pkg, (".py",)), pkg
        assert list((site / "engine").glob("_cmm*.so")), "no compiled kernel in the image"
        model = Path(env["UFB_MODEL"])
        assert _files(root / model.relative_to("/")) == _files(ROOT / "models" / model.name)
        assert (root / model.relative_to("/")).stat().st_uid == who.uid  # COPY --chown: the service owns it
        log = tmp_path / "service.log"
        argv = cfg["Entrypoint"] + (cfg.get("Cmd") or [])
        with log.open("w") as out:
            proc = subprocess.Popen(
                images.command_in(root, argv, env, cfg["WorkingDir"], who), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            _wait_ready(proc, port, log)
            _assert_runs_as(proc, who)
            health = subprocess.run(
                images.command_in(root, cfg["Healthcheck"]["Test"][1:], env, cfg["WorkingDir"], who),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert health.returncode == 0, health.stderr[-2000:]
            info = _get_json(_url(port, "/info"))
            assert info["kernel"]["compiled"], info["kernel"]
            assert info["model"]["name"] == Settings.model_fields["model"].default.name
            assert len(_embed(port)) == 384
            assert images.stop(proc, timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert json.loads(text.splitlines()[0])  # UFB_LOG_FORMAT=json from the image's ENV


@pytest.mark.timeout(3600)
def test_ray_image_builds_and_serves_on_ray_as_user_ray(
    debian_base: str, build_args: dict[str, str], build_log: Path, tmp_path: Path
) -> None:
    base = images.ray_base(debian_base, build_log)
    images.build(
        DOCKER / "ray" / "Dockerfile",
        ROOT,
        RAY_TAG,
        {"RAY_IMAGE": base, **build_args},
        build_log,
        ignorefile=DOCKER / "ray" / "Dockerfile.dockerignore",
    )
    cfg = images.config(RAY_TAG)
    assert cfg["User"] == "1000:100"  # Ray's image's user, which KubeRay's pods run as
    port = _free_port()
    env = images.image_env(cfg)
    argv = ["ultrafastbert", "serve", "--ray", "--ray-replicas", "1", "--port", str(port)]
    with images.container_root(RAY_TAG) as root:
        who = images.resolve_user(root, cfg["User"])
        log = tmp_path / "ray.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                images.command_in(root, argv, env, cfg["WorkingDir"], who), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            _wait_ready(proc, port, log)
            _assert_runs_as(proc, who)
            assert _get_json(_url(port, "/info"))["kernel"]["compiled"]
            assert len(_embed(port)) == 384
            # /ready answers before `serve.run` has returned; `docker stop` of a running service comes after it
            # (tests/test_ray.py stops one during the deployment)
            _wait_for_line(proc, log, "serving on Ray")
            assert images.stop(proc, timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stopped cleanly" in log.read_text()
