"""Issue 29's burst against a running server: N bursts back to back of REQUESTS one-sentence embedding requests,
INFLIGHT at a time, through one ``httpx.AsyncClient`` with a pool of CONNS connections (httpx's defaults
otherwise: keepalive_expiry 5 s). Prints per burst the count of each status and of each transport error, and for
every transport error whether its request went on a reused connection (docs/overload.md):

    .venv/bin/ultrafastbert serve --port 8000 [--keep-alive-timeout-s 5] &
    nice -n 10 .venv/bin/python docs/experiments/burst.py http://127.0.0.1:8000 --bursts 10
"""

import argparse
import asyncio
import collections
import time

import httpx

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a short sentence",
    "serving embeddings on a cpu",
    "seven wizards quietly judge boxing matches",
    "hello world",
]


async def burst(c: httpx.AsyncClient, requests: int, inflight: int) -> tuple[collections.Counter, list, float]:
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
                r = await c.post(
                    "/v1/embeddings",
                    json={"input": SENTENCES[i % len(SENTENCES)], "model": "m"},
                    extensions={"trace": trace},
                )
                counts[r.status_code] += 1
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
    a = p.parse_args()
    limits = httpx.Limits(max_connections=a.conns, max_keepalive_connections=a.conns)
    lost = 0
    async with httpx.AsyncClient(base_url=a.url, limits=limits, timeout=120) as c:
        for k in range(a.bursts):
            counts, failures, took = await burst(c, a.requests, a.inflight)
            lost += len(failures)
            print(f"burst {k}: {dict(counts)} ({took:.0f} s)", flush=True)
            for f in failures:
                print("   ", f, flush=True)
    print(f"{a.bursts} bursts, {a.bursts * a.requests} requests: {lost} without a response")


if __name__ == "__main__":
    asyncio.run(main())
