"""Start and stop a local ``ultrafastbert serve`` on a free loopback port (compare mode, soak, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``python -m service serve --model PATH`` as a child process; a context manager that waits for /ready."""

    def __init__(
        self,
        model: str | Path,
        *,
        port: int | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.model = Path(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args or [])
        self.env = env
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None  # the open log_path while the server runs

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> LocalServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UFB_")}  # flags below are the config
        env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(self.env or {})})
        cmd = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.args,
        ]
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        stdout = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server for {self.model} exited with {self.proc.returncode}"
                    + (f" (log: {self.log_path})" if self.log_path else "")
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server for {self.model} not ready within {self.ready_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_of(pid: int, peak: bool = False) -> float | None:
    """Resident set size in bytes from /proc (Linux): now, or its peak so far (VmHWM); None when unreadable."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None
