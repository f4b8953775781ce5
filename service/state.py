"""The service's lifecycle: load -> warm -> ready -> draining, and the objects the routes share.

Why a separate phase machine: liveness (/health) and readiness (/ready) must differ while the model loads and
while the service drains on shutdown; load balancers rely on that to route around a replica without killing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.backend import ModelBackend, Task
from engine.batcher import Batcher, BatcherLimits, worker_threads
from engine.precision import COMPUTE_DTYPES, cpu_features, is_native
from service.metrics import ServiceMetrics
from service.settings import Settings

if TYPE_CHECKING:  # imported lazily at run time, so the service module imports even without the extension
    from engine.checkpoint import LoadedModel
    from engine.cmm import KernelInfo

log = logging.getLogger("service")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_from_settings(settings: Settings, *, hint: str = "pass --model PATH or set UFB_MODEL") -> LoadedModel:
    """The model ``settings`` names, packed in their weight dtype, with torch's threads set first (packing runs
    on them). Used where a process loads before it serves (the CLI, each Ray replica), so a broken folder fails
    the start: a missing folder raises :class:`engine.checkpoint.CheckpointError` with ``hint`` on what to set.
    """
    from engine.checkpoint import CheckpointError, load_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path = Path(settings.model)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist ({hint})")
    return load_model(path, weight_dtype=DTYPES[settings.weight_dtype])


class Phase:
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


def kernel_info() -> KernelInfo:
    """``engine.cmm.KERNEL``; imported lazily so the service module imports even without the extension."""
    from engine.cmm import KERNEL

    return KERNEL


class ServiceState:
    """Everything the routes need, created by ``create_app`` and started by the app's lifespan."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.loaded = loaded
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.backend: ModelBackend | None = None
        self.batcher: Batcher | None = None
        self.max_input_tokens = settings.max_input_tokens or 0
        self.neurons_per_token: list[tuple[int, int]] = []
        self.shutdown_started: float | None = None  # time.monotonic() of begin_shutdown
        self.ready_since: float | None = None  # time.time() when the model became ready (OpenAI's "created")
        self.cpu = cpu_features()

    # ------------------------------------------------------------------ derived facts

    @property
    def compute_native(self) -> bool:
        """Whether the configured compute precision runs in hardware on this CPU (engine.precision)."""
        return is_native(COMPUTE_DTYPES[self.settings.compute_dtype], self.cpu)

    @property
    def ready(self) -> bool:
        return self.phase == Phase.READY

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return str(getattr(self.loaded, "name", None) or "ultrafastbert")

    @property
    def loaded_model(self) -> LoadedModel:
        """The loaded model: a service past loading has one (a ready one always does)."""
        if self.loaded is None:
            raise RuntimeError(f"no model is loaded (state: {self.phase})")
        return self.loaded

    @property
    def labels(self) -> list[str] | None:
        return None if self.loaded is None else self.loaded.config.labels

    def neurons_for(self, n_tokens: int) -> tuple[int, int]:
        """Feedforward neurons ``n_tokens`` real tokens evaluate, and what the dense model would."""
        return (
            n_tokens * sum(e for e, _ in self.neurons_per_token),
            n_tokens * sum(d for _, d in self.neurons_per_token),
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load (if not given), build the batcher, warm up; failures leave the service alive but unready."""
        try:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            loaded = self.loaded
            if loaded is None:
                self.phase = Phase.LOADING
                from engine.checkpoint import load_model

                loaded = self.loaded = await asyncio.to_thread(
                    load_model, self.settings.model, weight_dtype=DTYPES[self.settings.weight_dtype]
                )
            self._build()
            assert self.batcher is not None
            self.batcher.start()
            self.phase = Phase.WARMING
            if self.settings.warmup:
                await self._warmup()
            if self.phase == Phase.WARMING:  # a shutdown may have begun meanwhile
                self.phase = Phase.READY
                self.ready_since = time.time()
                self.metrics.ready.set(1)
                log.info("ready: serving %s", self.model_name, extra={"model_path": str(loaded.path)})
        except Exception as exc:  # noqa: BLE001 - reported by /ready and /info, and logged
            self.phase = Phase.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("the model could not be started: %s", self.error)

    def _build(self) -> None:
        loaded = self.loaded_model
        model_max = int(loaded.config.max_position_embeddings)
        wanted = self.settings.max_input_tokens
        if wanted and wanted > model_max:
            log.warning("max_input_tokens %d exceeds the model's %d positions; using %d", wanted, model_max, model_max)
        self.max_input_tokens = min(wanted or model_max, model_max)
        self.backend = ModelBackend(loaded, compute_dtype=COMPUTE_DTYPES[self.settings.compute_dtype])
        if not self.compute_native:
            log.warning(
                "compute_dtype %s is not native on this CPU (%s): expect it to be slower than float32",
                self.settings.compute_dtype,
                self.cpu,
            )
        self.neurons_per_token = [(e, d) for e, d in loaded.model.neurons_per_token()]
        self.metrics.set_model(
            self.neurons_per_token,
            loaded.model.fff_layers(),
            {
                "name": self.model_name,
                "path": str(loaded.path),
                "layout": loaded.config.layout,
                "ffn": loaded.config.ffn,
                "compute_dtype": self.settings.compute_dtype,
                "compute_native": str(self.compute_native).lower(),
                "cpu_capability": self.cpu.capability,
            },
        )
        kernel = kernel_info()
        self.metrics.kernel_compiled.set(1 if kernel.compiled else 0)
        if not kernel.compiled and loaded.config.ffn == "fff":
            log.warning("!!! %s -- inference will be much slower than advertised !!!", kernel.describe())
        s = self.settings
        limits = BatcherLimits(
            max_batch_tokens=s.max_batch_tokens,
            max_batch_requests=s.max_batch_requests,
            max_wait_s=s.max_batch_wait_ms / 1000.0,
            max_queued_inputs=s.max_queued_inputs,
            max_queued_tokens=s.max_queued_tokens,
            max_concurrent_requests=s.max_concurrent_requests,
            max_input_tokens=self.max_input_tokens,
            tokenizer_workers=s.tokenizer_workers,
            record_leaves=s.record_leaves,
            inference_workers=s.inference_workers,
            threads_per_worker=worker_threads(s.inference_workers, s.torch_threads),
        )
        if limits.max_batch_tokens < self.max_input_tokens:
            log.warning(
                "max_batch_tokens (%d) is below max_input_tokens (%d): a long input still runs, alone",
                limits.max_batch_tokens,
                self.max_input_tokens,
            )
        self.batcher = Batcher(self.backend, limits, observer=self.metrics)
        self.metrics.bind_batcher(self.batcher)

    async def _warmup(self) -> None:
        """One pass per task so the first real request does not pay for lazy initialisation."""
        assert self.batcher is not None
        observer, self.batcher.observer = self.batcher.observer, None  # warm-up is not traffic
        try:
            await self.batcher.submit(Task.EMBED, texts=["warm up"], truncate=True)
            if self.labels:
                await self.batcher.submit(Task.CLASSIFY, texts=["warm up"], truncate=True)
        finally:
            self.batcher.observer = observer

    def begin_shutdown(self) -> None:
        """Readiness goes false and new work is refused; admitted work continues (called on SIGTERM)."""
        if self.shutdown_started is None:
            self.shutdown_started = time.monotonic()
            log.info("shutting down: readiness is off, new work is refused, admitted work continues")
        if self.phase != Phase.FAILED:
            self.phase = Phase.DRAINING
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.stop_accepting()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self.batcher is not None:
            # one grace period from SIGTERM, not a fresh one after uvicorn has already waited for connections
            assert self.shutdown_started is not None
            left = (
                self.settings.shutdown_grace_s
                + self.settings.shutdown_delay_s
                - (time.monotonic() - self.shutdown_started)
            )
            drained = await self.batcher.drain(max(0.0, left))
            if not drained:
                log.warning(
                    "shutdown grace period (%.1fs) ran out with work still queued", self.settings.shutdown_grace_s
                )
            await asyncio.to_thread(self.batcher.stop)
