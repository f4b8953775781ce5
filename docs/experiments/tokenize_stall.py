"""How long a maximal ``/tokenize`` request holds a real server's event loop (docs/serving.md).

Starts ``ultrafastbert serve`` (the default model) on a free port, sends four times a body just under the 2 MB
payload limit (~360,000 tokens, ~26 MB of JSON back), and meanwhile probes ``/health`` every 2 ms from a separate
process (so that reading the big response here cannot delay the probe); prints the request's time and the worst
``/health`` latency:

    .venv/bin/python docs/experiments/tokenize_stall.py
"""

import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time

import httpx


def probe(url: str, start: mp.Event, stop: mp.Event, worst: mp.Queue) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        while True:
            start.wait()
            longest = 0.0
            while not stop.is_set():
                t = time.perf_counter()
                c.get("/health")
                longest = max(longest, time.perf_counter() - t)
                time.sleep(0.002)
            worst.put(longest)
            start.clear()
            stop.clear()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    start, stop, worst = mp.Event(), mp.Event(), mp.Queue()
    prober = mp.Process(target=probe, args=(url, start, stop, worst), daemon=True)
    text = ("the quick brown fox jumps over a lazy dog while critics praise " * 40000)[:1_900_000]
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(240):
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            prober.start()
            for _ in range(4):
                start.set()
                time.sleep(0.05)
                t = time.perf_counter()
                r = c.post(
                    "/tokenize", content=json.dumps({"inputs": text}), headers={"content-type": "application/json"}
                )
                elapsed = time.perf_counter() - t
                stop.set()
                print(
                    f"/tokenize: {r.status_code}, {len(r.json()[0])} tokens, {len(r.content) / 1e6:.1f} MB in "
                    f"{elapsed:.2f} s, worst /health {worst.get() * 1e3:.0f} ms",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
