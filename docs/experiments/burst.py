"""Issue 29's burst against a running server: N bursts back to back of REQUESTS one-sentence embedding requests,
INFLIGHT at a time, through one ``httpx.AsyncClient`` with a pool of CONNS connections (httpx's defaults
otherwise: keepalive_expiry 5 s). Prints per burst the count of each status and of each transport error, and for
every transport error whether its request went on a reused connection (docs/overload.md). Each 200 is checked
against the embedding the server gave for the same sentence alone before the bursts (cosine >= 0.9999, else it
counts as "wrong vector"); each 429/503 without Retry-After counts as "no Retry-After". After each burst, one
request alone (its status and time) and, with --pid, the server's RSS and peak RSS:

    .venv/bin/ultrafastbert serve --port 8000 [--keep-alive-timeout-s 5] & SERVER=$!
    nice -n 10 .venv/bin/python docs/experiments/burst.py http://127.0.0.1:8000 --bursts 10 --pid $SERVER
"""

import argparse
import asyncio
import collections
import math
import time

import httpx

from loadtest.servers import rss_of

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a short sentence",
    "serving embeddings on a cpu",
    "seven wizards quietly judge boxing matches",
    "hello world",
]


def embed_request(i: int) -> dict:
    return {"input": SENTENCES[i % len(SENTENCES)], "model": "m"}


def same_vector(a: list[float], b: list[float]) -> bool:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return len(a) == len(b) and norms > 0 and dot / norms >= 0.9999


def rss_mib(pid: int) -> str:
    now, peak = rss_of(pid) or 0.0, rss_of(pid, peak=True) or 0.0
    return f"RSS {now / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB)"


async def burst(
    c: httpx.AsyncClient, requests: int, inflight: int, refs: list[list[float]]
) -> tuple[collections.Counter, list, float]:
    sem = asyncio.Semaphore(inflight)
    counts: collections.Counter = collections.Counter()
    failures: list = []
    t0 = time.monotonic()

    async def one(i: int) -> None:
        events: list[str] = []

        async def trace(name: str, info: dict) -> None:
            events.append(name)

        async with sem:
            try:
                r = await c.post("/v1/embeddings", json=embed_request(i), extensions={"trace": trace})
                counts[r.status_code] += 1
                if r.status_code == 200 and not same_vector(r.json()["data"][0]["embedding"], refs[i % len(refs)]):
                    counts["wrong vector"] += 1
                if r.status_code in (429, 503) and "retry-after" not in r.headers:
                    counts["no Retry-After"] += 1
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] += 1
                reused = "connection.connect_tcp.started" not in events
                failures.append((i, round(time.monotonic() - t0, 2), repr(exc), "reused" if reused else "new"))

    await asyncio.gather(*(one(i) for i in range(requests)))
    return counts, failures, time.monotonic() - t0


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--inflight", type=int, default=600)
    p.add_argument("--conns", type=int, default=600)
    p.add_argument("--bursts", type=int, default=1)
    p.add_argument("--pid", type=int, help="the server's process id: print its RSS after each burst (Linux)")
    a = p.parse_args()
    limits = httpx.Limits(max_connections=a.conns, max_keepalive_connections=a.conns)
    lost = 0
    async with httpx.AsyncClient(base_url=a.url, limits=limits, timeout=120) as c:
        refs = []
        for i in range(len(SENTENCES)):
            r = await c.post("/v1/embeddings", json=embed_request(i))
            r.raise_for_status()
            refs.append(r.json()["data"][0]["embedding"])
        if a.pid:
            print("before:", rss_mib(a.pid), flush=True)
        for k in range(a.bursts):
            counts, failures, took = await burst(c, a.requests, a.inflight, refs)
            lost += len(failures)
            t0 = time.monotonic()
            r = await c.post("/v1/embeddings", json=embed_request(0))
            alone = f"{r.status_code} in {(time.monotonic() - t0) * 1000:.0f} ms"
            rss = f", {rss_mib(a.pid)}" if a.pid else ""
            print(f"burst {k}: {dict(counts)} ({took:.0f} s); one request right after: {alone}{rss}", flush=True)
            for f in failures:
                print("   ", f, flush=True)
    print(f"{a.bursts} bursts, {a.bursts * a.requests} requests: {lost} without a response")


if __name__ == "__main__":
    asyncio.run(main())
