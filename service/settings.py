"""Service settings: one pydantic-settings model, read from ``UFB_*`` environment variables and CLI flags.

Why one flat model: every option must be settable both ways (containers use env vars, people use flags), and
``/info`` shows every limit, so a single source of truth avoids the three drifting apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "ultrafastbert-minilm-l6"


class Settings(BaseSettings):
    """Every knob of ``ultrafastbert serve``; the env var is ``UFB_`` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="UFB_", extra="ignore", protected_namespaces=())

    # --- network
    host: str = Field("127.0.0.1", description="Interface to bind; use 0.0.0.0 inside a container.")
    port: int = Field(8000, ge=0, le=65535)
    keep_alive_timeout_s: int = Field(
        75,
        ge=1,
        le=3600,
        description="Close a connection after this long with no request: idle between "
        "requests, or connected and silent. Keep it above clients' own idle expiry (httpx 5 s, aiohttp 15 s, load "
        "balancers often 60 s) so the client closes idle connections first: a close by the server can cross a "
        "request the client just sent on that connection, which then fails with no response (docs/overload.md). "
        "Advertised in a 'Keep-Alive: timeout=N' response header.",
    )
    backlog: int = Field(
        2048,
        ge=1,
        description="Connections the kernel queues for accepting (capped by "
        "net.core.somaxconn); beyond it a connect waits for a SYN retry, nothing is lost.",
    )

    # --- model
    model: Path = Field(DEFAULT_MODEL_PATH, description="Checkpoint folder to serve.")
    served_model_name: str | None = Field(None, description="Name reported to clients (default: the config's).")
    weight_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the packed FFF weights."
    )
    compute_dtype: Literal["float32", "bfloat16", "int8"] = Field(
        "float32",
        description="Precision of the encoder's dense matrix products (engine/precision.py): bfloat16 "
        "(autocast; native on AMX / AVX-512-BF16, emulated and slower elsewhere) or int8 (dynamically quantized "
        "linears). Both are opt-in: their fidelity to float32 is in docs/serving.md.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of each inference worker "
        "while all are busy (default: torch's choice divided among the workers).",
    )
    inference_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads that run forward passes, each on its own "
        "batch; with several, a worker running alone uses all the torch threads and "
        "busy workers share them equally.",
    )

    # --- batching and queueing
    max_batch_tokens: int = Field(16384, ge=1, description="Tokens (summed over the inputs) per forward pass.")
    max_batch_requests: int = Field(64, ge=1, description="Sequences per forward pass.")
    max_batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a busy worker lets a batch grow; no wait when idle."
    )
    max_queued_inputs: int = Field(1024, ge=1, description="Inputs waiting for inference before 429.")
    max_queued_tokens: int = Field(262144, ge=1, description="Tokens waiting for inference before 429.")
    max_concurrent_requests: int = Field(512, ge=1, description="Requests admitted at once before 429.")
    tokenizer_workers: int = Field(2, ge=1, le=64, description="Threads that tokenize off the event loop.")

    # --- per-request limits
    max_inputs_per_request: int = Field(32, ge=1, description="Inputs in one request (TEI's client batch size).")
    max_inputs_per_openai_request: int = Field(
        2048,
        ge=1,
        description="Inputs in one /v1/embeddings request (OpenAI's limit); more than "
        "max_inputs_per_request are queued a slice at a time, so other requests interleave with them.",
    )
    max_input_tokens: int | None = Field(
        None, ge=1, description="Tokens per input (default: the model's max positions)."
    )
    auto_truncate: bool = Field(False, description="Truncate long inputs instead of answering 422.")
    payload_limit: int = Field(2_000_000, ge=1024, description="Request body limit in bytes.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline from arrival to answer; past it: 504.")

    # --- security, observability, lifecycle
    api_key: SecretStr | None = Field(None, description="If set, required as 'Authorization: Bearer <key>'.")
    metrics_require_key: bool = Field(
        False, description="Also require the API key for /metrics (/health and /ready stay open for probes)."
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_created: bool = Field(
        False, description="Also export every counter's and histogram's _created series (creation timestamps)."
    )
    record_leaves: bool = Field(True, description="Record FFF leaf visits for the leaf-evenness metrics.")
    leaf_half_life_tokens: int = Field(
        20000, ge=1, description="Half-life, in tokens, of the decayed leaf-visit counts."
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="How long shutdown waits for admitted work.")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="After SIGTERM, keep the port open this long answering /ready "
        "with 503 (new work 503 too) so load balancers notice, then drain.",
    )
    warmup: bool = Field(True, description="Run a warm-up batch before reporting ready.")

    @field_validator("api_key")
    @classmethod
    def _empty_key_means_none(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is not None and not v.get_secret_value() else v

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v
