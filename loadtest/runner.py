"""Closed-loop and open-loop load against one server, and the report they produce.

* Closed loop: ``concurrency`` clients, each sends its next request when the previous answer arrives. Measures
  capacity (requests per second at a given number of users); it hides queueing, because clients slow down
  with the server.
* Open loop: requests arrive at a fixed ``rate`` (evenly spaced, or Poisson), whatever the server does.
  Latency is measured from the *scheduled* send time, so a server that falls behind shows its queueing delay
  instead of hiding it (no coordinated omission).

Both run a warm-up first (same load, not recorded), then measure for ``duration_s``. Only requests *sent*
within the measured window are recorded; throughput counts the successful ones over the window.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.corpus import TextMix

try:
    import aiohttp
except ImportError:  # optional (the 'loadtest' extra): everything but sending load works without it
    aiohttp = None  # type: ignore[assignment]

MISSING_AIOHTTP = "the load generator needs aiohttp: pip install 'ultrafastbert-serve[loadtest]' (or aiohttp)"

ROUTES = ("/v1/embeddings", "/embed", "/predict", "/classify")


@functools.lru_cache(maxsize=64)
def endpoint(url: str, route: str) -> str:
    """Where a request for ``route`` goes on the server ``url``.

    A URL without a path is a server root: ``http://host:8000`` + ``/v1/embeddings``. A URL with a path names
    the endpoint itself, so servers that mount routes elsewhere can be targeted too, e.g. Infinity's
    ``http://host:7997/embeddings``; its last segment must be the route's (``embeddings`` for /v1/embeddings)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path:
        return url.rstrip("/") + route
    last = route.rsplit("/", 1)[-1]
    if path.rsplit("/", 1)[-1] != last:
        raise ValueError(f"{url}: a target URL's path must end with /{last} for route {route} (or give no path)")
    return urllib.parse.urlunsplit(parts._replace(path=path))


@dataclass
class Sample:
    sent: float  # scheduled (open loop) or actual (closed loop) send time, perf_counter seconds
    latency_s: float
    status: str  # HTTP status as text, or the exception name for transport errors
    inputs: int
    tokens: int = 0  # x-compute-tokens (tokens the server computed), 0 when absent
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    server_total_ms: float = 0.0


@dataclass
class Workload:
    """What each request carries. ``inputs_per_request`` > 1 sends lists (up to the server's limit)."""

    route: str = "/v1/embeddings"
    inputs_per_request: int = 1
    encoding_format: str = "base64"  # what the OpenAI Python client sends by default
    seed: int = 0
    source: str = "auto"
    api_key: str | None = None
    model: str = "ufb"  # the OpenAI request's "model"; servers that host several (Infinity) route by it
    mix: TextMix = field(init=False)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}")
        self.mix = TextMix(seed=self.seed, source=self.source)

    def body(self) -> tuple[dict[str, Any], int]:
        texts = self.mix.texts(self.inputs_per_request)
        one: Any = texts[0] if self.inputs_per_request == 1 else texts
        if self.route == "/v1/embeddings":
            return {"input": one, "model": self.model, "encoding_format": self.encoding_format}, len(texts)
        if self.route == "/predict" and self.inputs_per_request > 1:
            one = [[t] for t in texts]  # TEI's batch form: a flat list of two strings would be a sentence pair
        return {"inputs": one}, len(texts)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class Report:
    mode: str
    url: str
    route: str
    concurrency: int | None
    rate: float | None
    duration_s: float
    warmup_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    rps: float  # successful requests per second
    inputs_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float]  # of successful requests: mean, p50, p95, p99, max
    server_ms: dict[str, float]  # means of the timing headers of successful requests
    text_source: str
    dropped: int = 0  # open loop: arrivals not sent because max_inflight requests were outstanding
    client_cpu_cores: float = math.nan  # CPU the load generator itself used (it shares the machine's cores)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        load = f"concurrency {self.concurrency}" if self.mode == "closed" else f"rate {self.rate:g}/s"
        lat = self.latency_ms
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        lines = [
            f"{self.mode} loop, {load}, {self.route} on {self.url}: {self.duration_s:.1f}s measured after "
            f"{self.warmup_s:.1f}s warm-up ({self.text_source})",
            f"  requests {self.requests}, ok {self.ok}, errors {errs}"
            + (f", dropped {self.dropped}" if self.dropped else ""),
            f"  throughput {self.rps:.2f} req/s, {self.inputs_per_s:.2f} inputs/s, {self.tokens_per_s:.0f} tokens/s",
            f"  latency ms: p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  "
            f"mean {lat['mean']:.1f}  max {lat['max']:.1f}",
            f"  server ms (mean): queue {self.server_ms['queue']:.1f}, inference {self.server_ms['inference']:.1f}, "
            f"total {self.server_ms['total']:.1f}; load generator CPU {self.client_cpu_cores:.2f} cores",
        ]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summarize(
    samples: list[Sample],
    *,
    mode: str,
    url: str,
    workload: Workload,
    duration_s: float,
    warmup_s: float,
    concurrency: int | None = None,
    rate: float | None = None,
    dropped: int = 0,
) -> Report:
    ok = [s for s in samples if s.status.startswith("2")]
    errors = Counter(s.status for s in samples if not s.status.startswith("2"))
    lat = [s.latency_s * 1e3 for s in ok]
    dur = max(duration_s, 1e-9)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    return Report(
        mode=mode,
        url=url,
        route=workload.route,
        concurrency=concurrency,
        rate=rate,
        duration_s=duration_s,
        warmup_s=warmup_s,
        requests=len(samples),
        ok=len(ok),
        errors=dict(errors),
        rps=len(ok) / dur,
        inputs_per_s=sum(s.inputs for s in ok) / dur,
        tokens_per_s=sum(s.tokens for s in ok) / dur,
        latency_ms={
            "mean": mean(lat),
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": max(lat) if lat else math.nan,
        },
        server_ms={
            "queue": mean([s.queue_ms for s in ok]),
            "inference": mean([s.inference_ms for s in ok]),
            "total": mean([s.server_total_ms for s in ok]),
        },
        text_source=workload.mix.source,
        dropped=dropped,
    )


def _float(headers: Mapping[str, str], name: str) -> float:
    try:
        return float(headers.get(name, "0"))
    except ValueError:
        return 0.0


def _transport_error(exc: BaseException) -> str:
    """A failed request's label: "timeout", "ConnectError" (nothing listening, refused, unresolvable) or the
    client's exception name."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's own timeout errors derive from it
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    return type(exc).__name__


async def _one(client: Client, workload: Workload, sent: float) -> Sample:
    body, n = workload.body()
    try:
        url = endpoint(client.url, workload.route)
        async with client.session.post(url, json=body, headers=workload.headers()) as r:
            await r.read()
            status, h = r.status, r.headers
    except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
        return Sample(sent, time.perf_counter() - sent, _transport_error(exc), n)
    latency = time.perf_counter() - sent
    return Sample(
        sent,
        latency,
        str(status),
        n,
        int(_float(h, "x-compute-tokens")),
        _float(h, "x-queue-time"),
        _float(h, "x-inference-time"),
        _float(h, "x-total-time"),
    )


@dataclass
class Client:
    """One virtual user: an aiohttp session holding a single keep-alive connection.

    Why aiohttp and one connection per user: the load generator shares the machine's cores with the server under
    test, and every millisecond of its CPU is taken from the server, most from the faster one (it sends more
    requests). aiohttp with one keep-alive connection per user costs the least client CPU per request of the
    clients tried (httpx, bare httpcore); a shared pool scans every connection on every request."""

    url: str
    session: aiohttp.ClientSession

    async def aclose(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def make_client(url: str, timeout_s: float) -> Client:
    """Must be called inside the running event loop (aiohttp binds the session to it)."""
    if aiohttp is None:
        raise ImportError(MISSING_AIOHTTP)
    connector = aiohttp.TCPConnector(limit=1, ssl=_tls_context())
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))
    return Client(url.rstrip("/"), session)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Shared: building a context (loading the CA certificates) costs ~50 ms of CPU, too much per virtual user."""
    return ssl.create_default_context()


class ClientPool:
    """Idle single-connection clients for the open loop: O(1) per request, grows up to the in-flight cap."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._idle: list[Client] = []
        self._all: list[Client] = []

    def acquire(self) -> Client:
        if self._idle:
            return self._idle.pop()
        client = make_client(self.url, self.timeout_s)
        self._all.append(client)
        return client

    def release(self, client: Client) -> None:
        self._idle.append(client)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._all))


async def closed_loop(
    url: str,
    workload: Workload,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 2.0,
    timeout_s: float = 60.0,
    max_requests: int | None = None,
) -> Report:
    """``concurrency`` clients back to back for ``warmup_s + duration_s`` (or until ``max_requests`` measured)."""
    samples: list[Sample] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s

    async def user() -> None:
        async with make_client(url, timeout_s) as client:
            while True:
                now = time.perf_counter()
                if now >= end or (max_requests is not None and len(samples) >= max_requests):
                    return
                s = await _one(client, workload, now)
                if s.sent >= start:
                    samples.append(s)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    measured = min(duration_s, max(time.perf_counter() - start, 1e-9))
    if max_requests is not None and samples:
        measured = max(max(s.sent + s.latency_s for s in samples) - start, 1e-9)
    rep = summarize(
        samples,
        mode="closed",
        url=url,
        workload=workload,
        duration_s=measured,
        warmup_s=warmup_s,
        concurrency=concurrency,
    )
    rep.client_cpu_cores = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    return rep


async def open_loop(
    url: str,
    workload: Workload,
    *,
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    timeout_s: float = 60.0,
    poisson: bool = False,
    max_inflight: int = 1024,
    seed: int = 0,
) -> Report:
    """Arrivals at ``rate`` per second regardless of answers; latency counted from the scheduled send time."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    samples: list[Sample] = []
    dropped = 0
    inflight: set[asyncio.Task[None]] = set()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    pool = ClientPool(url, timeout_s)
    try:
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + duration_s
        due = t0

        async def fire(at: float) -> None:
            client = pool.acquire()
            try:
                s = await _one(client, workload, at)
            finally:
                pool.release(client)
            if at >= start:
                samples.append(s)

        while due < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= max_inflight:
                dropped += due >= start
            else:
                task = asyncio.ensure_future(fire(due))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            due += rng.expovariate(rate) if poisson else 1.0 / rate
        if inflight:
            await asyncio.gather(*inflight)
    finally:
        await pool.aclose()
    rep = summarize(
        samples,
        mode="open",
        url=url,
        workload=workload,
        duration_s=duration_s,
        warmup_s=warmup_s,
        rate=rate,
        dropped=dropped,
    )
    rep.client_cpu_cores = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    return rep


async def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} (labels sorted), for before/after deltas."""
    from prometheus_client.parser import text_string_to_metric_families

    async with make_client(url, timeout_s) as c, c.session.get(c.url + "/metrics") as r:
        r.raise_for_status()
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def batch_shape(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size and tokens per batch between two scrapes (all tasks)."""

    def delta(prefix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix + "{"))

    batches = delta("ufb_batch_size_count")
    cpu = delta("process_cpu_seconds_total")
    if batches <= 0:
        return {
            "batches": 0.0,
            "mean_size": math.nan,
            "mean_tokens": math.nan,
            "inference_s_per_batch": math.nan,
            "process_cpu_s": cpu,
        }
    return {
        "batches": batches,
        "mean_size": delta("ufb_batch_size_sum") / batches,
        "mean_tokens": delta("ufb_batch_tokens_sum") / batches,
        "inference_s_per_batch": delta("ufb_batch_inference_duration_seconds_sum") / batches,
        "process_cpu_s": cpu,
    }
