"""A real server's peak memory and responsiveness while it answers one large request (docs/serving.md).

Starts ``ultrafastbert serve`` (the default model) on a free port, sends 32 inputs of 512 tokens to ROUTE (default
``/embed_all``; ``/embed`` gives the baseline of the forward pass alone), reads the body as a stream, probes
``/health`` every 5 ms meanwhile, and prints the server's VmHWM / VmRSS (kB) before and after:

    .venv/bin/python docs/experiments/embed_all_memory.py [/embed_all | /embed]
"""

import asyncio
import socket
import subprocess
import sys
import time

import httpx

from loadtest.servers import rss_of

ROUTE = sys.argv[1] if len(sys.argv) > 1 else "/embed_all"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    PORT = s.getsockname()[1]
server = subprocess.Popen(
    [sys.executable, "-m", "service", "serve", "--port", str(PORT)],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)


def memory_kb() -> list[str]:
    return [f"{(rss_of(server.pid, peak=p) or 0) / 1024:.0f}" for p in (True, False)]


async def main() -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=120) as c:
        for _ in range(240):
            try:
                if (await c.get("/ready")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        await c.post(ROUTE, json={"inputs": ["warm up"] * 4})
        print("before: VmHWM, VmRSS kB", memory_kb())
        stop = asyncio.Event()

        async def probe() -> float:
            worst = 0.0
            while not stop.is_set():
                t = time.perf_counter()
                await c.get("/health")
                worst = max(worst, time.perf_counter() - t)
                await asyncio.sleep(0.005)
            return worst

        prober = asyncio.ensure_future(probe())
        t, n = time.perf_counter(), 0
        body = {"inputs": [" ".join(["word"] * 600)] * 32, "truncate": True}
        async with c.stream("POST", ROUTE, json=body) as r:
            async for chunk in r.aiter_bytes():
                n += len(chunk)
        elapsed = time.perf_counter() - t
        stop.set()
        print(
            f"{ROUTE}: {r.status_code}, {n / 1e6:.1f} MB in {elapsed:.2f} s, "
            f"worst /health {await prober * 1e3:.0f} ms; "
            f"after: VmHWM, VmRSS kB {memory_kb()}"
        )


try:
    asyncio.run(main())
finally:
    server.terminate()
    server.wait()
