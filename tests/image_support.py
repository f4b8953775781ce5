"""Building docker/'s images for real with podman, and running what they hold (tests/test_images.py).

* Base images: no image registry is reachable here, so the Dockerfiles' base-image build arguments name local
  images made once with ``debootstrap`` (Debian bookworm, Python 3.11 from Debian's packages) and kept in podman's
  store under a tag that hashes their recipe: a re-run reuses them, and podman's layer cache the build steps.
* Packages: the machine's own pip configuration (its indexes, wheel folders, constraints and CA bundle, each
  mounted read-only at the same path) is passed into the build, so pip inside reaches what pip here reaches; the
  Dockerfiles' defaults are untouched.
* Running: ``podman run`` is refused on these machines (their sandbox denies setting rlimits), so the built image
  is created as a container whose root filesystem podman mounts, and its entrypoint runs there under ``chroot``
  in fresh mount and PID namespaces (so it is PID 1, as under ``docker run``), with the image's environment,
  working directory and user (``USER`` from the image's config) - the steps ``docker run`` takes, minus the network
  namespace: the service binds a free port of this machine instead of the image's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the official python:3.11-slim images give a Dockerfile: a `python` with headers (the kernel compiles
# against them), venv and CA certificates.
BASE_PACKAGES = ("python3", "python3-dev", "python3-venv", "python-is-python3", "ca-certificates")
# The python images' apt sources: the release, its updates and security fixes (the pinned versions come from them).
APT_SOURCES = f"""Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
# Ray's image as the Ray Dockerfile uses it: user ray (uid 1000, group users), a Python it owns first on PATH.
RAY_BASE_CONTAINERFILE = """FROM {base}
RUN useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray \\
 && python -m venv /home/ray/anaconda3 && chown -R 1000:100 /home/ray/anaconda3
ENV PATH=/home/ray/anaconda3/bin:$PATH
USER 1000:100
WORKDIR /home/ray
"""
PIP_PATH_KEYS = ("find-links", "extra-index-url", "index-url", "constraint", "cert", "client-cert")


class ImageError(Exception):
    pass


def missing_tools() -> list[str]:
    return [t for t in ("podman", "debootstrap", "unshare", "chroot") if shutil.which(t) is None]


def podman(*args: str, timeout: float = 120, nice: bool = False) -> str:
    argv = (["nice", "-n", "10"] if nice else []) + ["podman", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise ImageError(f"{shlex.join(argv)}: status {done.returncode}\n{done.stderr[-4000:]}")
    return done.stdout.strip()


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag]).returncode == 0


def _recipe_tag(name: str, recipe: str) -> str:
    return f"localhost/{name}:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def debian_base(log: Path) -> str:
    """The local stand-in for python:3.11-slim-bookworm, made once (debootstrap + podman import) and then reused."""
    recipe = json.dumps([SUITE, MIRROR, BASE_PACKAGES, APT_SOURCES, BASE_ENV])
    tag = _recipe_tag("ufb-test-base", recipe)
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="ufb-debootstrap-") as tmp:
        root = Path(tmp) / "root"
        with log.open("a") as out:
            done = subprocess.run(
                [
                    "nice",
                    "-n",
                    "10",
                    "debootstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(BASE_PACKAGES),
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1500,
            )
        if done.returncode != 0:
            raise ImageError(f"debootstrap failed with status {done.returncode}: see {log}")
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(APT_SOURCES)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / cache).glob("*"):
                if p.is_file():
                    p.unlink()
        changes = [a for env in BASE_ENV for a in ("--change", f"ENV {env}")] + ["--change", 'CMD ["python3"]']
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(
            ["podman", "import", *changes, "-", tag], stdin=tar.stdout, capture_output=True, text=True, timeout=600
        )
        tar.wait()
        if done.returncode != 0 or tar.returncode != 0:
            raise ImageError(f"podman import failed: {done.stderr[-2000:]}")
    return tag


def ray_base(debian: str, log: Path) -> str:
    """Ray's image as the Ray Dockerfile needs it (see RAY_BASE_CONTAINERFILE), on the Debian base."""
    text = RAY_BASE_CONTAINERFILE.format(base=debian)
    tag = _recipe_tag("ufb-test-ray-base", text)
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="ufb-ray-base-") as tmp:
        (Path(tmp) / "Containerfile").write_text(text)
        build(Path(tmp) / "Containerfile", Path(tmp), tag, {}, log, ignorefile=None)
    return tag


def pip_config() -> tuple[str, list[str], str]:
    """(pip.conf text, paths to mount read-only, the index torch's build argument should name) from the
    configuration pip has on this machine (files and PIP_* variables, as ``pip config list`` merges them)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    values: dict[str, str] = {}
    for line in listed.splitlines():
        m = re.match(r"^[\w:-]*\.([\w-]+)='(.*)'$", line)
        if m:
            values[m.group(1)] = m.group(2)
    mounts = set()
    for key in PIP_PATH_KEYS:
        for word in values.get(key, "").split():
            path = word.removeprefix("file://").rstrip("/")
            if key.endswith("index-url") and path.endswith("/simple"):
                path = path.removesuffix("/simple")  # a local index's pages link to files beside simple/
            if path.startswith("/") and os.path.exists(path):
                mounts.add(path)
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(values.items()))
    return text, sorted(mounts), values.get("index-url", "https://pypi.org/simple")


def build(
    dockerfile: Path,
    context: Path,
    tag: str,
    build_args: dict[str, str],
    log: Path,
    ignorefile: Path | None,
    timeout: float = 2400,
) -> None:
    """``podman build`` (chroot isolation, Docker's image format so HEALTHCHECK is kept), its output in ``log``.

    The image the tag named before, when the build replaced it, is removed with the layers only it used (the layer
    cache keeps the steps the new image shares), so a run after each change does not leave gigabytes behind."""
    before = image_id(tag)
    conf_text, mounts, _ = pip_config()
    with tempfile.TemporaryDirectory(prefix="ufb-pipconf-") as tmp:
        conf = Path(tmp) / "pip.conf"
        conf.write_text(conf_text)
        conf.chmod(0o644)
        volumes = [f"{conf}:/etc/pip.conf:ro"] + [f"{p}:{p}:ro" for p in mounts]
        argv = [
            "nice",
            "-n",
            "10",
            "podman",
            "build",
            "--isolation",
            "chroot",
            "--format",
            "docker",
            "--network",
            "host",
            "--layers",
            "-f",
            str(dockerfile),
            "-t",
            tag,
        ]
        if ignorefile is not None:  # podman 4 does not look for <Dockerfile>.dockerignore itself
            argv += ["--ignorefile", str(ignorefile)]
        for name, value in build_args.items():
            argv += ["--build-arg", f"{name}={value}"]
        for v in volumes:
            argv += ["--volume", v]
        argv.append(str(context))
        with log.open("a") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(line for line in log.read_text().splitlines() if "WARNING: Location" not in line)[-4000:]
        raise ImageError(f"podman build of {dockerfile} failed with status {done.returncode}:\n{tail}")
    if before is not None and before != image_id(tag):
        subprocess.run(["podman", "rmi", before], capture_output=True)  # in use by a container: it stays


def image_id(tag: str) -> str | None:
    done = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def context_files(context: Path, ignorefile: Path) -> set[str]:
    """The files a build of ``context`` with ``ignorefile`` receives, as podman's builder filters them: copied whole
    into a throw-away image (``FROM scratch``, ``COPY . /context/``) and listed from it."""
    tag = "localhost/ufb-test-context:probe"
    with tempfile.TemporaryDirectory(prefix="ufb-context-") as tmp:
        containerfile = Path(tmp) / "Containerfile"
        containerfile.write_text("FROM scratch\nCOPY . /context/\n")
        podman(
            "build",
            "--isolation",
            "chroot",
            "-q",
            "-f",
            str(containerfile),
            "--ignorefile",
            str(ignorefile),
            "-t",
            tag,
            str(context),
            timeout=600,
            nice=True,
        )
    try:
        top = Path(podman("image", "mount", tag)) / "context"
        return {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file() or p.is_symlink()}
    finally:
        subprocess.run(["podman", "image", "umount", tag], capture_output=True)
        subprocess.run(["podman", "rmi", tag], capture_output=True)


def config(tag: str) -> dict:
    """The image's config (Env, User, WorkingDir, Entrypoint, Cmd, ExposedPorts) and Healthcheck (which podman's
    inspect shows beside the config)."""
    image = json.loads(podman("image", "inspect", tag))[0]
    return {**image["Config"], "Healthcheck": image.get("Healthcheck") or image["Config"].get("Healthcheck")}


@contextmanager
def container_root(tag: str) -> Iterator[Path]:
    """The root filesystem of a new container of ``tag`` (the image's layers plus a writable one, as under
    ``docker run``), mounted on this machine; removed afterwards."""
    cid = podman("create", tag)
    try:
        yield Path(podman("mount", cid))
    finally:
        subprocess.run(["podman", "umount", cid], capture_output=True)
        subprocess.run(["podman", "rm", "-f", cid], capture_output=True)


@dataclass
class Identity:
    uid: int
    gid: int
    home: str  # the user's home in the image's /etc/passwd ("/" when it has no entry), HOME unless ENV sets one


def resolve_user(root: Path, user: str) -> Identity:
    """``USER name[:group]`` or ``uid[:gid]`` the way the runtime resolves it, from the image's own passwd/group."""
    name, _, group = user.partition(":")
    name = name or "root"

    def lookup(file: str, key: str, field: int) -> int:
        if key.isdigit():
            return int(key)
        for line in (root / file).read_text().splitlines():
            parts = line.split(":")
            if parts[0] == key:
                return int(parts[field])
        raise ImageError(f"{key!r} is not in the image's /{file}")

    uid = lookup("etc/passwd", name, 2)
    entry = next(
        (
            p
            for p in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())
            if p[0] == name or (name.isdigit() and p[2] == name)
        ),
        None,
    )
    gid = lookup("etc/group", group, 2) if group else int(entry[3]) if entry else 0
    return Identity(uid, gid, entry[5] if entry else "/")


def command_in(root: Path, argv: list[str], env: dict[str, str], workdir: str, who: Identity) -> list[str]:
    """A host command that runs ``argv`` inside ``root`` like a container process: own mount and PID namespaces
    (``argv`` is PID 1), /proc and /dev mounted, chroot, the image's user, working directory and environment only
    (plus HOME from the user's entry, as ``docker run`` adds it)."""
    inner = [
        "chroot",
        f"--userspec={who.uid}:{who.gid}",
        f"--groups={who.gid}",
        str(root),
        "/usr/bin/env",
        "-i",
        "-C",
        workdir,
        *(f"{k}={v}" for k, v in {"HOME": who.home, **env}.items()),
        *argv,
    ]
    script = 'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && shift && exec "$@"'
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--", "sh", "-c", script, "sh", str(root), *inner]


def image_env(cfg: dict, **overrides: str) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    env.setdefault("HOSTNAME", "ufb-image-test")
    env.update(overrides)
    return env


def namespace_init(pid: int) -> int:
    """The host pid of the PID-1 process that ``unshare --fork`` (pid) started."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise ImageError("the container's first process did not start")


def stop(proc: subprocess.Popen, timeout: float) -> int:
    """``docker stop``: SIGTERM to the container's PID 1, then its exit status (SIGKILL after ``timeout``)."""
    os.kill(namespace_init(proc.pid), signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ImageError(f"no exit within {timeout} s of SIGTERM") from None
