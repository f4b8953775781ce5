"""Latency of one short request at concurrency 1, and where it goes (the server's timing headers).

Starts the service on a model folder, sends 50 unrecorded requests, then 300 measured ones, one at a time:

    python docs/experiments/single_request.py models/ultrafastbert-minilm-l6
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx

from loadtest.servers import LocalServer


def main(model: str, text: str = "The movie was great.") -> None:
    with LocalServer(model) as srv, httpx.Client(base_url=srv.url) as c:
        body = {"input": text, "model": "any"}
        for _ in range(50):
            c.post("/v1/embeddings", json=body)
        lat, inference, total = [], [], []
        for _ in range(300):
            t0 = time.perf_counter()
            r = c.post("/v1/embeddings", json=body)
            lat.append((time.perf_counter() - t0) * 1e3)
            inference.append(float(r.headers["x-inference-time"]))
            total.append(float(r.headers["x-total-time"]))
        print(
            f"{text!r} ({r.headers['x-compute-tokens']} tokens): p50 {statistics.median(lat):.2f} ms at the client, "
            f"server x-total-time {statistics.median(total):.2f} ms, "
            f"x-inference-time {statistics.median(inference):.2f} ms"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
