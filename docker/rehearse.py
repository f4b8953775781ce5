"""Rehearse docker/Dockerfile without a Docker engine: run its build steps on this machine in a scratch root, then
start the image's entrypoint the way `docker run` would and check it serves.

    python docker/rehearse.py [--dockerfile docker/Dockerfile] [--keep] [--json report.json]

Why: no Docker engine runs where this project is developed and tested, yet the Dockerfile is what operators run.
tests/test_deploy.py proves the deployment files agree with each other; this proves the steps work:

* the build stage's own commands (read from the Dockerfile, not repeated here) create the virtual environment,
  install torch and compile the CMM kernel with a non-editable ``pip install`` from a context filtered by
  ``Dockerfile.dockerignore``;
* the runtime stage starts from an empty root and gets only what its ``COPY`` lines give it (the build stage's
  tree is moved aside first), so anything the image forgot to copy is missing here too;
* the image's ``ENV``, ``WORKDIR``, ``USER`` and ``ENTRYPOINT`` start the service as the non-root user it names,
  the ``HEALTHCHECK`` command passes against it, ``/ready`` turns 200, ``/info`` reports the compiled kernel, an
  embedding request succeeds, and SIGTERM (what ``docker stop`` sends) ends it with status 0.

What it cannot prove, and says so in its log: the base image (a system Python of the same minor version stands
in), apt packages (the host's are checked with dpkg instead), user creation (the service runs under the uid/gid
the ``useradd``/``groupadd`` lines name), and network package indexes (``--index-url`` is dropped: pip's offline
configuration here serves the same pinned versions). Image paths (``/opt``, ``/src``, ...) live under the scratch
root: the stages share one root path, so the virtual environment's absolute paths stay valid when it is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM_DIRS = {
    "usr",
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "etc",
    "var",
    "tmp",
    "dev",
    "proc",
    "sys",
    "run",
    "root",
    "boot",
}
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SKIPPED_COMMANDS = ("apt-get", "apt", "groupadd", "useradd")
HANDLED = ("RUN", "ENV", "WORKDIR", "USER", "COPY", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD")  # + ARG, FROM, LABEL


class RehearsalError(Exception):
    pass


@dataclass
class Instruction:
    line: int
    name: str  # upper case: FROM, RUN, ...
    args: str


@dataclass
class Stage:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (as BuildKit reads them)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        name, _, args = buf.partition(" ")
        out.append(Instruction(start, name.upper(), args.strip()))
        buf = ""
    if buf:
        raise RehearsalError(f"line {start}: the file ends inside a continued instruction")
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` (and ``${VAR:-default}``) from the build's ARG/ENV values; unknown ones expand empty."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = variables.get(name, "")
        return value if value or default is None else default

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, text)


# ------------------------------------------------------------------------------------------------ .dockerignore


def ignore_patterns(dockerfile: Path, context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """``<Dockerfile>.dockerignore`` (BuildKit's per-Dockerfile file) or the context's ``.dockerignore``."""
    for path in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if path.is_file():
            break
    else:
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        regex = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pat[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pat[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pat[i]), i + 1
        patterns.append((negate, re.compile(regex.strip("/") + r"\Z")))
    return patterns


def excluded(rel: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, regex in patterns:
        if any(regex.match(c) for c in candidates):
            verdict = not negate
    return verdict


# ------------------------------------------------------------------------------------------------ the rehearsal


class Rehearsal:
    def __init__(
        self, dockerfile: Path, context: Path, scratch: Path, build_args: dict[str, str], timeout_s: float
    ) -> None:
        self.dockerfile, self.context, self.scratch = dockerfile, context, scratch
        self.root = scratch / "root"
        self.instructions = parse_dockerfile(dockerfile.read_text())
        self.build_args = build_args
        self.timeout_s = timeout_s
        self.ignore = ignore_patterns(dockerfile, context)
        self.image_dirs = self._image_dirs()
        self.users: dict[str, tuple[int, int]] = {}
        self.groups: dict[str, int] = {}
        self.stages: dict[str, Path] = {}
        self.report: dict[str, object] = {"dockerfile": str(dockerfile), "skipped": [], "stand_ins": []}
        self.standin_bin = scratch / "standin" / "bin"

    def log(self, msg: str) -> None:
        print(f"[rehearse] {msg}", flush=True)

    # -------------------------------------------------------------- paths

    def _image_dirs(self) -> set[str]:
        """Top-level image directories the Dockerfile creates or uses (``/opt``, ``/src``, ...): those are mapped
        into the scratch root; system ones (``/usr``, ``/var``, ...) are the host's."""
        dirs = set()
        for ins in self.instructions:
            if ins.name in ("WORKDIR", "COPY", "ENV", "RUN"):
                dirs |= set(re.findall(r"(?<![\w.:/$-])/([A-Za-z0-9_.-]+)", ins.args))
        return dirs - SYSTEM_DIRS

    def rewrite(self, text: str) -> str:
        if not self.image_dirs:
            return text
        alt = "|".join(sorted(map(re.escape, self.image_dirs)))
        return re.sub(rf"(?<![\w.:/$-])/({alt})(?=/|\b|$)", lambda m: f"{self.root}/{m.group(1)}", text)

    def host(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    # -------------------------------------------------------------- steps

    def run(self) -> dict[str, object]:
        global_args: dict[str, str] = {}
        stage: Stage | None = None
        for ins in self.instructions:
            if ins.name == "ARG":
                name, has_default, default = ins.args.partition("=")
                if stage is None:
                    global_args[name] = self.build_args.get(name, default)
                else:  # inside a stage, a bare `ARG NAME` brings the global value in
                    stage.args[name] = self.build_args.get(name, default if has_default else global_args.get(name, ""))
                continue
            if ins.name == "FROM":
                stage = self._from(ins, stage, global_args)
                continue
            if stage is None:
                raise RehearsalError(f"line {ins.line}: {ins.name} before FROM")
            if ins.name == "LABEL":  # metadata only
                continue
            if ins.name not in HANDLED:
                raise RehearsalError(f"line {ins.line}: {ins.name} is not supported by the rehearsal")
            getattr(self, "_" + ins.name.lower())(ins, stage)
        if stage is None:
            raise RehearsalError("no FROM in the Dockerfile")
        self.report["final_stage"] = stage.name
        self._serve(stage)
        return self.report

    def _vars(self, stage: Stage) -> dict[str, str]:
        return {**stage.args, **stage.env}

    def _from(self, ins: Instruction, previous: Stage | None, global_args: dict[str, str]) -> Stage:
        words = expand(ins.args, global_args).split()
        image = words[0]
        name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(self.stages)}"
        if previous is not None:  # set the finished stage aside: the next starts from an empty root
            kept = self.scratch / f"stage-{previous.name}"
            self.root.rename(kept)
            self.stages[previous.name] = kept
        self.root.mkdir(parents=True)
        self.root.chmod(0o755)
        self._standin_python(image)
        self.log(f"FROM {image} AS {name} (line {ins.line}): empty root {self.root}")
        return Stage(name=name, env={"PATH": BASE_PATH})  # the python images' PATH

    def _standin_python(self, image: str) -> None:
        """The base image's ``python``: a system interpreter of the same minor version, readable by any user."""
        if self.standin_bin.is_dir():
            return
        m = re.search(r"python:(\d+)\.(\d+)", image)
        wanted = f"python{m.group(1)}.{m.group(2)}" if m else f"python{sys.version_info[0]}.{sys.version_info[1]}"
        found = next((p for p in (Path("/usr/local/bin") / wanted, Path("/usr/bin") / wanted) if p.is_file()), None)
        if found is None:
            raise RehearsalError(f"no system {wanted} (in /usr/local/bin or /usr/bin) to stand in for {image}")
        self.standin_bin.mkdir(parents=True)
        for alias in ("python", "python3", wanted):
            (self.standin_bin / alias).symlink_to(found)
        version = subprocess.run(
            [str(found), "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.report["stand_ins"].append(f"{image}: host {found} (Python {version})")  # type: ignore[union-attr]
        self.log(f"base image {image}: stand-in {found} (Python {version})")

    def _env_for_commands(self, stage: Stage) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}  # this machine's offline index
        env.update({"HOME": str(self.scratch / "home-build"), "LANG": "C.UTF-8"})
        env.update(stage.env)
        env["PATH"] = self.with_standin(env["PATH"])
        return env

    def with_standin(self, path: str) -> str:
        """The image's PATH with the stand-in ``python`` ahead of the system directories."""
        return path.replace(BASE_PATH, f"{self.standin_bin}:{BASE_PATH}", 1)

    def _run(self, ins: Instruction, stage: Stage) -> None:
        command = expand(ins.args, self._vars(stage))
        kept = []
        for part in re.split(r"\s+&&\s+", command):
            words = shlex.split(part)
            if not words:
                continue
            if words[0] in SKIPPED_COMMANDS:
                self._skip_system_command(words, ins)
                continue
            if words[:3] == ["rm", "-rf", "/var/lib/apt/lists/*"]:
                continue
            if "pip" in words[:3]:  # pip ... or python -m pip ...
                part = self._offline_pip(words, ins)
            kept.append(self.rewrite(part))
        if not kept:
            return
        script = " && ".join(kept)
        self.log(f"RUN (line {ins.line}): {script}")
        cwd = self.host(stage.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["/bin/sh", "-c", script], cwd=cwd, env=self._env_for_commands(stage), timeout=self.timeout_s
        )
        if done.returncode != 0:
            raise RehearsalError(f"line {ins.line}: RUN failed with status {done.returncode}: {script}")

    def _skip_system_command(self, words: list[str], ins: Instruction) -> None:
        skipped: list[str] = self.report["skipped"]  # type: ignore[assignment]
        if words[0] in ("apt-get", "apt"):
            if "install" not in words:
                return
            packages = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
            if missing:
                raise RehearsalError(f"line {ins.line}: the image installs {missing}, which this host lacks")
            skipped.append(f"line {ins.line}: apt-get install {' '.join(packages)} (present on the host)")
            return

        def flag(name: str) -> str | None:
            return words[words.index(name) + 1] if name in words else None

        name = words[-1]
        if words[0] == "groupadd":
            self.groups[name] = int(flag("--gid") or 10000 + len(self.groups))
        else:
            group = flag("--gid") or name  # a number or a group name
            gid = int(group) if group.isdigit() else self.groups.get(group, 0)
            self.users[name] = (int(flag("--uid") or 10000 + len(self.users)), gid)
        skipped.append(f"line {ins.line}: {words[0]} {name} (the service runs under the ids it names)")

    def _offline_pip(self, words: list[str], ins: Instruction) -> str:
        out, skip_next = [], False
        for w in words:
            if skip_next:
                skip_next = False
                continue
            if w in ("--index-url", "-i", "--extra-index-url"):
                skip_next = True
                self.report["skipped"].append(  # type: ignore[union-attr]
                    f"line {ins.line}: pip {w} (no network; this machine's offline index serves the pinned versions)"
                )
                continue
            if w.startswith(("--index-url=", "--extra-index-url=")):
                continue
            out.append(w)
        return shlex.join(out)

    def _env(self, ins: Instruction, stage: Stage) -> None:
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            pairs = [(words[0], " ".join(words[1:]))]
        else:
            pairs = [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]
        for key, value in pairs:
            stage.env[key] = self.rewrite(expand(value, self._vars(stage)))

    def _workdir(self, ins: Instruction, stage: Stage) -> None:
        stage.workdir = expand(ins.args, self._vars(stage))
        self.host(stage.workdir).mkdir(parents=True, exist_ok=True)

    def _user(self, ins: Instruction, stage: Stage) -> None:
        stage.user = expand(ins.args, self._vars(stage))

    def _copy(self, ins: Instruction, stage: Stage) -> None:
        words = shlex.split(expand(ins.args, self._vars(stage)))
        flags = {w.partition("=")[0]: w.partition("=")[2] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        sources, dest = paths[:-1], paths[-1]
        owner = self.ids(flags["--chown"]) if "--chown" in flags else None
        target = self.host(dest if dest.startswith("/") else f"{stage.workdir}/{dest}")
        for src in sources:
            if "--from" in flags:
                base = self.stages.get(flags["--from"])
                if base is None:
                    raise RehearsalError(f"line {ins.line}: no stage {flags['--from']!r} to copy from")
                origin, rel_base = base / src.lstrip("/"), None
            else:
                origin, rel_base = self.context / src, src.rstrip("/")
            if not origin.exists():
                raise RehearsalError(f"line {ins.line}: COPY source {src} does not exist")
            copied = self._copy_tree(origin, target, dest.endswith("/") or len(sources) > 1, rel_base)
            if copied == 0:
                raise RehearsalError(f"line {ins.line}: COPY {src}: every file is excluded by the dockerignore")
            self.log(
                f"COPY (line {ins.line}) {src} -> {dest}: {copied} files"
                + (f", owner {owner[0]}:{owner[1]}" if owner else "")
            )
        if owner is not None:
            for path in [target, *target.rglob("*")] if target.is_dir() else [target]:
                os.chown(path, *owner, follow_symlinks=False)

    def _copy_tree(self, origin: Path, target: Path, into_dir: bool, rel_base: str | None) -> int:
        """Docker's COPY: a directory's contents into ``target``; a file to ``target`` (or into it with a trailing
        slash). Context sources go through the dockerignore."""
        if origin.is_file() or origin.is_symlink() and not origin.is_dir():
            if rel_base is not None and excluded(rel_base, self.ignore):
                return 0
            dst = target / origin.name if into_dir else target
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, dst, follow_symlinks=False)
            return 1
        count = 0
        for path in sorted(origin.rglob("*")):
            rel = path.relative_to(origin).as_posix()
            if rel_base is not None and excluded(f"{rel_base}/{rel}" if rel_base else rel, self.ignore):
                continue
            dst = target / rel
            if path.is_dir() and not path.is_symlink():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst, follow_symlinks=False)
            count += 1
        target.mkdir(parents=True, exist_ok=True)
        return count

    def ids(self, spec: str) -> tuple[int, int]:
        user, _, group = spec.partition(":")
        uid, gid = (int(user), 0) if user.isdigit() else self.users.get(user, (-1, -1))
        if uid < 0:
            raise RehearsalError(f"unknown user {user!r} (no useradd line names it)")
        if group:
            gid = int(group) if group.isdigit() else self.groups.get(group, gid)
        return uid, gid

    def _expose(self, ins: Instruction, stage: Stage) -> None:
        self.report["expose"] = ins.args.split()

    def _healthcheck(self, ins: Instruction, stage: Stage) -> None:
        options, _, command = ins.args.partition("CMD")
        opts = dict(re.findall(r"--([\w-]+)=(\S+)", options))
        self.report["healthcheck"] = {"options": opts, "command": self._exec_form(command.strip())}

    def _entrypoint(self, ins: Instruction, stage: Stage) -> None:
        self.report["entrypoint"] = self._exec_form(ins.args)

    def _cmd(self, ins: Instruction, stage: Stage) -> None:
        self.report["cmd"] = self._exec_form(ins.args)

    def _exec_form(self, args: str) -> list[str]:
        args = args.strip()
        return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]

    # -------------------------------------------------------------- docker run

    def _serve(self, stage: Stage) -> None:
        argv = list(self.report.get("entrypoint", [])) + list(self.report.get("cmd", []))  # type: ignore[arg-type]
        if not argv:
            raise RehearsalError("the image has neither ENTRYPOINT nor CMD")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"HOSTNAME": "rehearsal", **stage.env}
        env["PATH"] = self.with_standin(env["PATH"])
        env["UFB_PORT"] = str(port)  # `docker run -p` would map it; here the host's free port is used directly
        uid, gid = self.ids(stage.user)
        env.setdefault("HOME", self.rewrite(f"/home/{stage.user.split(':')[0]}") if uid else "/root")
        cwd = self.host(stage.workdir)
        as_user = os.geteuid() == 0
        user_kwargs: dict[str, object] = {"user": uid, "group": gid, "extra_groups": []} if as_user else {}
        self.report["user"] = {"uid": uid, "gid": gid, "switched": as_user}
        self.log(f"docker run: {shlex.join(argv)} as {uid}:{gid} in {cwd}, UFB_PORT={port}")
        logfile = (self.scratch / "service.log").open("w")
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, **user_kwargs
        )  # type: ignore[arg-type]
        try:
            self._probe(proc, env, port, cwd, user_kwargs)
        except BaseException:
            proc.kill()
            proc.wait()
            logfile.close()
            print((self.scratch / "service.log").read_text()[-4000:], file=sys.stderr)
            raise
        logfile.close()

    def _probe(
        self, proc: subprocess.Popen[bytes], env: dict[str, str], port: int, cwd: Path, user_kwargs: dict[str, object]
    ) -> None:
        health = self.report.get("healthcheck")
        if not health:
            raise RehearsalError("the image has no HEALTHCHECK")
        command = health["command"]  # type: ignore[index]
        deadline = time.monotonic() + self.timeout_s
        attempts = 0
        while True:
            if proc.poll() is not None:
                raise RehearsalError(f"the service exited with status {proc.returncode} before it was healthy")
            attempts += 1
            check = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=30, **user_kwargs)  # type: ignore[arg-type]
            if check.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RehearsalError(
                    f"HEALTHCHECK still failing after {attempts} attempts: {check.stderr.decode()[-400:]}"
                )
            time.sleep(1.0)
        self.report["health"] = {"passed": True, "attempts": attempts}
        self.log(f"HEALTHCHECK passed (attempt {attempts})")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        self.report["process_uid"] = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RehearsalError("/ready never turned 200")
            time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/info", timeout=10) as r:
            info = json.load(r)
        self.report["info"] = {
            "version": info.get("version"),
            "model": (info.get("model") or {}).get("name"),
            "kernel": info.get("kernel"),
        }
        body = json.dumps({"input": ["a rehearsal of the docker image"]}).encode()
        request = urllib.request.Request(f"{base}/v1/embeddings", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            data = json.load(r)
        self.report["embedding_dims"] = len(data["data"][0]["embedding"])
        self.log(f"/ready 200, /info {self.report['info']}, /v1/embeddings -> {self.report['embedding_dims']} dims")
        os.killpg(proc.pid, signal.SIGTERM)  # docker stop
        try:
            self.report["exit_status"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise RehearsalError("the service did not exit within 60 s of SIGTERM") from None
        self.log(f"SIGTERM -> exit status {self.report['exit_status']}")
        if self.report["exit_status"] != 0:
            raise RehearsalError(f"the service exited with status {self.report['exit_status']} after SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=REPO / "docker" / "Dockerfile")
    parser.add_argument("--context", type=Path, default=REPO, help="build context (default: the repository root)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--scratch", type=Path, help="empty folder to rehearse in (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one RUN step or for start-up")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="ufb-rehearsal-"))
    scratch.mkdir(parents=True, exist_ok=True)
    scratch.chmod(0o755)  # the image's user must reach the root inside it
    rehearsal = Rehearsal(
        args.dockerfile.resolve(),
        args.context.resolve(),
        scratch,
        dict(a.split("=", 1) for a in args.build_arg),
        args.timeout,
    )
    try:
        report = rehearsal.run()
        report["ok"] = True
        code = 0
    except (RehearsalError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
        report = {**rehearsal.report, "ok": False, "error": str(exc)}
        print(f"[rehearse] FAILED: {exc}", file=sys.stderr)
        code = 1
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    for note in report.get("skipped", []):  # type: ignore[union-attr]
        print(f"[rehearse] not rehearsed: {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
