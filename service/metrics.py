"""Prometheus metrics (prefix ``ufb_``), one :class:`CollectorRegistry` per app so tests and apps never share.

Neuron usage is exported as two counters per layer (evaluated and dense equivalent) rather than as a ratio:
``rate(evaluated) / rate(dense)`` is then correct over any window and across replicas, which a gauge is not.

Leaf evenness: each FFF tree routes every token to one of ``2^depth`` leaves. Training can collapse a tree onto
a few leaves (the model silently becomes smaller); that is worth an alert. We keep exponentially decayed visit
counts per (layer, tree, leaf) with a half-life in tokens and export

* ``ufb_fff_leaf_entropy_ratio``: entropy of the visit distribution / log(number of leaves); 1 is perfectly
  even, near 0 is collapsed;
* ``ufb_fff_leaves_used_ratio``: fraction of leaves getting at least 1% of an even share of the traffic.

A batch only adds its counts to the decayed totals; both gauges are computed from the totals when Prometheus
scrapes (:class:`_LeafEvenness`). Computing them per batch cost the inference worker about a third of a short
request's forward pass, before the request was answered.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from engine.batcher import Batcher, BatchStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
LENGTH_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
USED_SHARE = 0.01  # a leaf counts as used when it gets >= 1% of an even share

__all__ = ["ServiceMetrics", "CONTENT_TYPE_LATEST"]


class ServiceMetrics:
    """All metrics of one app; also the batcher's :class:`~engine.batcher.BatchObserver`."""

    def __init__(self, *, half_life_tokens: int = 20000, created_series: bool = False) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._created_series = created_series
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: the dashboard and `loadtest soak` use them
        ProcessCollector(registry=r)
        self.request_duration = Histogram(
            "ufb_request_duration_seconds",
            "HTTP request duration",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("ufb_requests", "HTTP requests", ["route", "status"], registry=r)
        self.queue_time = Histogram(
            "ufb_queue_duration_seconds",
            "Time a request waited for its first batch",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenization_time = Histogram(
            "ufb_tokenization_duration_seconds",
            "Tokenization time per request",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "ufb_batch_inference_duration_seconds",
            "Forward pass time per batch",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("ufb_batch_size", "Inputs per batch", ["task"], buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "ufb_batch_tokens", "Tokens per batch (packed: no padding)", ["task"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.input_length = Histogram(
            "ufb_input_length_tokens", "Tokens per input", ["task"], buckets=LENGTH_BUCKETS, registry=r
        )
        self.inputs = Counter("ufb_inputs", "Inputs answered", ["task"], registry=r)
        self.tokens = Counter("ufb_tokens", "Tokens answered", ["task"], registry=r)
        self.failures = Counter("ufb_failures", "Failed requests by cause", ["cause"], registry=r)
        self.auth_failures = Counter(
            "ufb_auth_failures", "Requests refused with 401 (reason: missing or invalid key)", ["reason"], registry=r
        )
        self.batch_failures = Counter("ufb_batch_failures", "Forward passes that raised", ["task"], registry=r)
        self.queue_depth = Gauge("ufb_queue_depth", "Inputs waiting for inference", registry=r)
        self.queue_tokens = Gauge("ufb_queue_tokens", "Tokens waiting for inference", registry=r)
        self.inflight_batches = Gauge("ufb_inflight_batches", "Batches in the forward pass now", registry=r)
        self.ready = Gauge("ufb_ready", "1 when the service answers /ready with 200", registry=r)
        self.kernel_compiled = Gauge(
            "ufb_cmm_kernel_compiled", "1 if the compiled CMM kernel runs, 0 on the slow reference fallback", registry=r
        )
        self.model_info = Info("ufb_model", "The served model", registry=r)
        self.neurons_evaluated = Counter(
            "ufb_ffn_neurons_evaluated", "Feedforward neurons evaluated", ["layer"], registry=r
        )
        self.neurons_dense = Counter(
            "ufb_ffn_neurons_dense", "Feedforward neurons a dense model would evaluate", ["layer"], registry=r
        )
        r.register(_LeafEvenness(self))

        self._npt: list[tuple[int, int]] = []
        self._fff_layers: list[str] = []
        self._half_life = float(half_life_tokens)
        self._leaf_counts: list[torch.Tensor] | None = None  # per FFF layer, decayed
        self._leaf_lock = threading.Lock()

    # ------------------------------------------------------------------ wiring

    def set_model(
        self, neurons_per_token: Sequence[tuple[int, int]], fff_layers: Sequence[int], info: dict[str, str]
    ) -> None:
        """Called once the model is loaded (the app, and so the registry, exists before that). ``fff_layers``:
        the layer index of each batch's leaf counts, in order (a hybrid's dense layers have none)."""
        self._npt = list(neurons_per_token)
        self._fff_layers = [str(i) for i in fff_layers]
        for layer in range(len(self._npt)):  # export zeros from the start so PromQL ratios exist
            self.neurons_evaluated.labels(str(layer))
            self.neurons_dense.labels(str(layer))
        # leaf gauges appear with the first batch: a 0 before any traffic would read as "collapsed"
        self.model_info.info(info)

    def bind_batcher(self, batcher: Batcher) -> None:
        """Gauges read the batcher at scrape time, so they are never stale."""
        self.queue_depth.set_function(lambda: batcher.queue_depth)
        self.queue_tokens.set_function(lambda: batcher.queued_tokens)
        self.inflight_batches.set_function(lambda: batcher.inflight_batches)

    def exposition(self) -> bytes:
        return generate_latest(self.registry if self._created_series else _WithoutCreated(self.registry))

    # ------------------------------------------------------------------ request level

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.request_duration.labels(route, str(status)).observe(seconds)
        self.requests.labels(route, str(status)).inc()

    def failure(self, cause: str) -> None:
        self.failures.labels(cause).inc()

    def observe_result(self, task: str, token_counts: Sequence[int], queue_s: float, tokenization_s: float) -> None:
        self.queue_time.labels(task).observe(queue_s)
        self.tokenization_time.labels(task).observe(tokenization_s)
        self.inputs.labels(task).inc(len(token_counts))
        self.tokens.labels(task).inc(sum(token_counts))
        hist = self.input_length.labels(task)
        for n in token_counts:
            hist.observe(n)

    # ------------------------------------------------------------------ batch level (worker thread)

    def on_batch(self, stats: BatchStats) -> None:
        task = stats.task.value
        self.inference_time.labels(task).observe(stats.inference_s)
        if stats.error is not None:
            self.batch_failures.labels(task).inc()
            return
        self.batch_size.labels(task).observe(stats.size)
        self.batch_tokens.labels(task).observe(stats.tokens)
        for layer, (evaluated, dense) in enumerate(self._npt):
            self.neurons_evaluated.labels(str(layer)).inc(evaluated * stats.tokens)
            self.neurons_dense.labels(str(layer)).inc(dense * stats.tokens)
        if stats.leaf_counts:
            self._update_leaves(stats.leaf_counts, stats.tokens)

    def _update_leaves(self, counts: Sequence[torch.Tensor], n_tokens: int) -> None:
        new = [c.double() for c in counts]  # per FFF layer [trees, leaves]; layers may differ in trees
        with self._leaf_lock:
            if self._leaf_counts is None or [c.shape for c in self._leaf_counts] != [c.shape for c in new]:
                self._leaf_counts = [torch.zeros_like(c) for c in new]
            decay = 0.5 ** (n_tokens / self._half_life)
            for total, c in zip(self._leaf_counts, new):
                total.mul_(decay).add_(c)

    def leaf_totals(self) -> list[tuple[str, torch.Tensor]]:
        """``(layer, decayed visits [trees, leaves])`` per FFF layer, copied; empty before the first batch."""
        with self._leaf_lock:
            if self._leaf_counts is None:
                return []
            return [(layer, c.clone()) for layer, c in zip(self._fff_layers, self._leaf_counts)]


class _LeafEvenness:
    """The leaf gauges, computed from :meth:`ServiceMetrics.leaf_totals` at scrape time. They appear with the first
    batch: a 0 before any traffic would read as "collapsed"."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        entropy_family, used_family = self._families()
        for layer, counts in self._metrics.leaf_totals():
            entropy, used = leaf_evenness(counts)
            for tree in range(counts.shape[0]):
                entropy_family.add_metric([layer, str(tree)], float(entropy[tree]))
                used_family.add_metric([layer, str(tree)], float(used[tree]))
        yield entropy_family
        yield used_family

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "ufb_fff_leaf_entropy_ratio",
                "Normalised entropy of decayed leaf visits (1 even, 0 collapsed)",
                labels=["layer", "tree"],
            ),
            GaugeMetricFamily(
                "ufb_fff_leaves_used_ratio",
                "Fraction of leaves with >= 1% of an even share of decayed visits",
                labels=["layer", "tree"],
            ),
        )


class _WithoutCreated:
    """The registry's families less the ``<name>_created`` samples of counters and histograms: a second series per
    child that dashboards do not use, doubling what Prometheus stores for them (opt back in: ``metrics_created``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():  # fresh objects per collection: safe to trim
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


def leaf_evenness(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy ratio, used ratio)`` over the last axis of non-negative visit counts."""
    n_leaves = counts.shape[-1]
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp(min=1e-300)
    plogp = torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    ratio = entropy / math.log(n_leaves) if n_leaves > 1 else torch.ones_like(entropy)
    used = (counts >= USED_SHARE * total / n_leaves).double().mean(-1)
    empty = total.squeeze(-1) <= 0
    return ratio.masked_fill(empty, 0.0), used.masked_fill(empty, 0.0)
