"""Connections under a burst and under idle clients (issue 29), against the real ``ultrafastbert serve`` process.

The burst reuses keep-alive connections the way a pooled client does: waves of hundreds of requests at once
through one ``httpx.AsyncClient``, pauses of 3-6 s between a user's requests. With uvicorn's default keep-alive timeout
(5 s) the server closed connections around the moment a user came back, and requests that crossed the
close got no response at all (``httpx.ReadError``); with the service's default (75 s) the server closes none.
Everything is on loopback, on the tiny random model, with small admission caps so that part of each wave is shed.
The keep-alive timer of service/connections.py is also checked alone, under uvicorn in this process with an app
that can be slow (which connections it closes, and which it must not).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import torch
import uvicorn
from service_support import metric, metric_samples, reference_embedding, tiny_loaded  # noqa: F401

from loadtest.servers import LocalServer, rss_of
from service.settings import Settings

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

        # the server's RSS sampled through the burst: its peak, not only where it ends, must stay bounded
        rss_samples: list[float] = []
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(0.05):
                rss = rss_of(srv.pid)
                if rss is not None:
                    rss_samples.append(rss)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            results = asyncio.run(asyncio.wait_for(burst(), 150))
        finally:
            sampling.set()
            sampler.join()
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
    assert rss_before is not None and rss_after is not None and len(rss_samples) >= 20, len(rss_samples)
    rss_peak = max(rss_samples + [rss_after])
    assert rss_peak - rss_before < RSS_GROWTH_BOUND, (
        f"RSS {rss_before / 2**20:.0f} -> peak {rss_peak / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    assert metric(samples, "ufb_queue_depth") == 0 and metric(samples, "ufb_queue_tokens") == 0
    assert metric(samples, "ufb_failures_total", cause="overloaded") == len(shed)
    assert after.status_code == 200
    # the server's keep-alive timeout is its default, and it says so to clients
    assert after.headers["keep-alive"] == f"timeout={Settings.model_fields['keep_alive_timeout_s'].default}"
    assert torch.allclose(
        torch.tensor(after.json()[0]), reference_embedding(tiny_loaded, "right after the burst"), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------------- the protocol's timer alone

PROTOCOL_KEEP_ALIVE_S = 1  # the smallest keep_alive_timeout_s the settings allow
SLOW_S = 2.5  # longer than the keep-alive timeout: a connection busy this long must not be closed


async def _slow_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """An ASGI app that waits ``before`` seconds before its response and ``during`` seconds between its headers
    and its body (query parameters)."""
    query = dict(parse_qsl(scope["query_string"].decode()))
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(float(query.get("before", 0)))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
    await asyncio.sleep(float(query.get("during", 0)))
    await send({"type": "http.response.body", "body": b"done"})


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One whole HTTP/1.1 response with a Content-Length: status line, lower-cased headers, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
    return status, headers, await reader.readexactly(int(headers[b"content-length"]))


def test_keep_alive_timer_closes_only_connections_with_no_request_in_progress() -> None:
    """service/connections.py's protocol under uvicorn with a 1 s keep-alive timeout: a silent connection is closed
    after the timeout (not before), and so is one idle after its response; a connection whose request arrived,
    is half sent, is being computed or is being written is never closed by the timer, however long that takes."""
    from service.connections import connection_options

    async def scenario() -> None:
        options = connection_options(Settings(keep_alive_timeout_s=PROTOCOL_KEEP_ALIVE_S))
        config = uvicorn.Config(_slow_app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", **options)
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), serving.exception()
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return reader, writer, time.monotonic()

        async def closed_after(reader: asyncio.StreamReader, since: float) -> float:
            assert await asyncio.wait_for(reader.read(1), 15) == b"", "data where a close was expected"
            return time.monotonic() - since

        def request(query: str = "") -> bytes:
            return f"GET /?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode()

        async def silent() -> float:
            reader, _, opened = await connect()
            return await closed_after(reader, opened)

        async def answered_then_idle(query: str, pause_first_s: float = 0.0, parts: tuple[bytes, ...] = ()) -> float:
            """One request (sent in ``parts`` with SLOW_S between them, if given) and a second on the same
            connection; both must be answered whole. Returns how long the connection stayed open after."""
            reader, writer, _ = await connect()
            await asyncio.sleep(pause_first_s)
            for k, part in enumerate(parts or (request(query),)):
                if k:
                    await asyncio.sleep(SLOW_S)
                writer.write(part)
            status, headers, body = await _response(reader)
            assert status == b"HTTP/1.1 200 OK" and body == b"done", (query, status, body)
            assert headers[b"keep-alive"] == f"timeout={PROTOCOL_KEEP_ALIVE_S}".encode()
            await asyncio.sleep(PROTOCOL_KEEP_ALIVE_S / 2)  # reused well within the timeout
            writer.write(request())
            status, _, body = await _response(reader)
            assert status == b"HTTP/1.1 200 OK" and body == b"done", ("second request", query, status, body)
            done = time.monotonic()
            return await closed_after(reader, done)

        try:
            idle = await asyncio.gather(
                silent(),
                answered_then_idle("", pause_first_s=PROTOCOL_KEEP_ALIVE_S / 2),  # first byte before the timeout
                answered_then_idle(f"before={SLOW_S}"),  # computed for longer than the timeout
                answered_then_idle(f"during={SLOW_S}"),  # written for longer than the timeout
                answered_then_idle("", parts=(b"GET / HTTP/1.1\r\nHost: t\r\n", b"\r\n")),  # half sent as long
            )
        finally:
            server.should_exit = True
            await serving
        # each closed by the timer once idle for the timeout: not before, and not many seconds later
        for seconds in idle:
            assert PROTOCOL_KEEP_ALIVE_S - 0.2 <= seconds < PROTOCOL_KEEP_ALIVE_S + 10, idle

    asyncio.run(asyncio.wait_for(scenario(), 60))


# ------------------------------------------------------------------------------------------------ slow loris

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
