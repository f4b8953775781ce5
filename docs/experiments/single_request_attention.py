"""One short request at concurrency 1, the same server code with the packed-attention kernel and without it (SDPA
per length group, ``engine.attention.use_kernel(False)`` in that server's process), alternating turns:

    python docs/experiments/single_request_attention.py models/ultrafastbert-minilm-l6 [--turns 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import httpx

from loadtest.servers import free_port

BODY = {"input": "The movie was great.", "model": "any"}


def start(model: str, kernel: bool, port: int) -> subprocess.Popen[bytes]:
    code = (
        f"import sys; import engine.attention as a; a.use_kernel({kernel}); from service.cli import main; "
        f"sys.exit(main(['serve', '--model', {model!r}, '--port', '{port}']))"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str) -> None:
    for _ in range(180):
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--turns", type=int, default=2)
    a = p.parse_args()
    ports = {"kernel": free_port()}
    while (port := free_port()) == ports["kernel"]:
        pass
    ports["sdpa"] = port
    procs = [start(a.model, name == "kernel", port) for name, port in ports.items()]
    try:
        for port in ports.values():
            wait_ready(f"http://127.0.0.1:{port}")
        for turn in range(a.turns):
            for name, port in ports.items():
                with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                    for _ in range(50):
                        c.post("/v1/embeddings", json=BODY)
                    lat, inference, total = [], [], []
                    for _ in range(300):
                        t0 = time.perf_counter()
                        r = c.post("/v1/embeddings", json=BODY)
                        lat.append((time.perf_counter() - t0) * 1e3)
                        inference.append(float(r.headers["x-inference-time"]))
                        total.append(float(r.headers["x-total-time"]))
                print(
                    f"turn {turn} {name}: p50 {statistics.median(lat):.2f} ms at the client, server x-total-time "
                    f"{statistics.median(total):.2f} ms, x-inference-time {statistics.median(inference):.2f} ms",
                    flush=True,
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


if __name__ == "__main__":
    main()
