"""Connections under a burst and under idle clients (issue 29), against the real ``ultrafastbert serve`` process.

The burst reuses keep-alive connections the way a pooled client does: waves of hundreds of requests at once
through one ``httpx.AsyncClient``, pauses of 3-6 s between a user's requests. With uvicorn's default keep-alive timeout
(5 s) the server closed connections around the moment a user came back, and requests that crossed the
close got no response at all (``httpx.ReadError``); with the service's default (75 s) the server closes none.
Everything is on loopback, on the tiny random model, with small admission caps so that part of each wave is shed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import torch
from service_support import metric, metric_samples, reference_embedding, tiny_loaded  # noqa: F401

from loadtest.servers import LocalServer, rss_of

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
CONNECTIONS = 300  # requests in flight at once, each on its own connection
WAVES = 2
CAPS = [
    "--max-concurrent-requests",
    "48",
    "--max-queued-inputs",
    "48",
    "--max-batch-requests",
    "16",
    "--max-batch-wait-ms",
    "2",
]
# Stated bound on the server's growth over the whole burst: 300 connections' buffers and protocol objects, the
# bounded queue (48 inputs), allocator slack; an unbounded queue or leaked connections would exceed it.
RSS_GROWTH_BOUND = 100 * 2**20


def text_of(i: int) -> str:
    n = 1 + (i * 7) % 12
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


async def _user(client: httpx.AsyncClient, u: int) -> list[tuple[int, httpx.Response | Exception, bool]]:
    """One of CONNECTIONS users: WAVES requests with a pause between them; each result says whether its request
    went on a reused connection."""
    out: list[tuple[int, httpx.Response | Exception, bool]] = []
    for w in range(WAVES):
        if w:  # pauses spread over 3-6 s: some connections are about 5 s idle on the server when reused
            await asyncio.sleep(3.0 + 3.0 * ((u * 37 + w * 11) % 100) / 100)
        i = w * CONNECTIONS + u
        events: list[str] = []

        async def trace(name: str, info: dict, events: list[str] = events) -> None:
            events.append(name)

        try:
            r: httpx.Response | Exception = await client.post(
                "/embed", json={"inputs": text_of(i)}, extensions={"trace": trace}
            )
        except httpx.HTTPError as exc:
            r = exc
        out.append((i, r, "connection.connect_tcp.started" not in events))
    return out


def test_burst_of_reused_connections_loses_no_request(tiny_model_dir: Path, tiny_loaded, tmp_path) -> None:
    log = tmp_path / "server.log"
    with LocalServer(tiny_model_dir, args=CAPS, log_path=log) as srv:
        assert srv.pid is not None
        httpx.post(srv.url + "/embed", json={"inputs": "warm"}, timeout=30).raise_for_status()
        rss_before = rss_of(srv.pid)

        async def burst() -> list[tuple[int, httpx.Response | Exception, bool]]:
            # the client keeps idle connections for less than the server's keep-alive timeout (75 s), as it must
            limits = httpx.Limits(
                max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=60
            )
            async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=60) as c:
                return [r for user in await asyncio.gather(*(_user(c, u) for u in range(CONNECTIONS))) for r in user]

        results = asyncio.run(asyncio.wait_for(burst(), 150))
        rss_after = rss_of(srv.pid)
        after = httpx.post(srv.url + "/embed", json={"inputs": "right after the burst"}, timeout=10)
        samples = metric_samples(httpx.get(srv.url + "/metrics", timeout=10).text)

    lost = [(i, repr(r), reused) for i, r, reused in results if isinstance(r, Exception)]
    assert not lost, f"{len(lost)} of {len(results)} requests got no response: {lost[:5]}\n{log.read_text()[-2000:]}"
    responses = [(i, r) for i, r, _ in results if isinstance(r, httpx.Response)]
    ok = [(i, r) for i, r in responses if r.status_code == 200]
    shed = [r for _, r in responses if r.status_code in (429, 503)]
    assert len(ok) + len(shed) == len(results), sorted({r.status_code for _, r in responses})
    assert len(shed) >= CONNECTIONS // 4, f"only {len(shed)} shed: the burst was not beyond capacity"
    assert len(ok) >= CONNECTIONS // 4, f"only {len(ok)} answered"
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error_type"] in ("Overloaded", "Unhealthy")
    refs: dict[str, torch.Tensor] = {}
    for i, r in ok:
        text = text_of(i)
        if text not in refs:
            refs[text] = reference_embedding(tiny_loaded, text)
        assert torch.allclose(torch.tensor(r.json()[0]), refs[text], atol=1e-5, rtol=0), i
    # the later waves went out on the first wave's connections: the case that used to cross a server close
    reused = sum(reused for i, _, reused in results if i >= CONNECTIONS)
    later = len(results) - CONNECTIONS
    assert reused >= 0.9 * later, f"only {reused} of {later} requests of the later waves reused a connection"
    assert rss_before is not None and rss_after is not None
    assert rss_after - rss_before < RSS_GROWTH_BOUND, f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    assert metric(samples, "ufb_queue_depth") == 0 and metric(samples, "ufb_queue_tokens") == 0
    assert metric(samples, "ufb_failures_total", cause="overloaded") == len(shed)
    assert after.status_code == 200
    assert torch.allclose(
        torch.tensor(after.json()[0]), reference_embedding(tiny_loaded, "right after the burst"), atol=1e-5, rtol=0
    )


IDLE = 250  # connections that connect and send nothing
PARTIAL = 250  # connections that send part of a request's headers and stop
KEEP_ALIVE_S = 3


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_do_not_starve_new_clients_and_silent_ones_are_closed(
    tiny_model_dir: Path, tiny_loaded, tmp_path
) -> None:
    with LocalServer(
        tiny_model_dir, args=["--keep-alive-timeout-s", str(KEEP_ALIVE_S)], log_path=tmp_path / "server.log"
    ) as srv:
        held: list[socket.socket] = []
        try:
            opened = time.monotonic()
            for _ in range(IDLE):
                held.append(_connect(srv.url))
            partial = []
            for _ in range(PARTIAL):
                s = _connect(srv.url)
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")
                partial.append(s)
            held += partial
            assert not any(_closed_by_server(s) for s in held), "closed before the keep-alive timeout"
            # new clients, each on a fresh connection, are answered (correctly) while all of those are held
            for i in range(20):
                with httpx.Client(base_url=srv.url, timeout=10) as c:
                    r = c.post("/embed", json={"inputs": text_of(i)})
                assert r.status_code == 200, r.text
                assert torch.allclose(
                    torch.tensor(r.json()[0]), reference_embedding(tiny_loaded, text_of(i)), atol=1e-5, rtol=0
                )
            # the silent ones are closed once the keep-alive timeout has passed, not before
            end = opened + KEEP_ALIVE_S + 15
            while not all(_closed_by_server(s) for s in held[:IDLE]):
                assert time.monotonic() < end, (
                    f"{sum(not _closed_by_server(s) for s in held[:IDLE])} silent connections still open"
                )
                time.sleep(0.2)
            assert time.monotonic() - opened >= KEEP_ALIVE_S - 0.5
            # a connection that finishes its request late is still served (the timer does not cut requests)
            body = b'{"inputs": "late but whole"}'
            s = partial[0]
            s.setblocking(True)
            s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200"), "a request completed late was not answered"
        finally:
            for s in held:
                s.close()
