"""Ray Serve options: one pydantic-settings model read from ``UFB_RAY_*`` variables and ``--ray-*`` flags.

Why separate from :class:`service.settings.Settings`: those are per-replica service settings (every replica gets
the same); these say how many replicas run, with how many CPUs, and how they are found. Keeping them apart lets
``build_app`` route each key of a flat argument dict (``serve run ... key=value``) to the right place, and keeps
``ray`` out of the import graph of the single-process service (this module does not import it).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEPLOYMENT_NAME = "UltraFastBERT"
TARGETS_PATH = "/ray/targets"  # Prometheus http_sd_configs endpoint, served by every replica
REPLICA_HEADER = "x-ufb-replica"  # which replica answered: on every response


class RayOptions(BaseSettings):
    """How the service runs on Ray Serve; the env var is ``UFB_RAY_`` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="UFB_RAY_", extra="forbid", protected_namespaces=())

    address: str | None = Field(
        None,
        description="Ray cluster to join (e.g. ray://head:10001 or auto); "
        "default: RAY_ADDRESS, else a running local cluster, else a new local one.",
    )
    app_name: str = Field("ultrafastbert", description="Serve application name.")
    replicas: int = Field(1, ge=1, description="Replicas (with autoscaling: how many to start with).")
    cpus_per_replica: float = Field(
        1.0, gt=0, description="Ray CPUs per replica; also its torch threads unless --torch-threads is set."
    )
    min_replicas: int | None = Field(
        None,
        ge=0,
        description="Autoscaling lower bound (turns autoscaling on; default 1 when only --ray-max-replicas is given).",
    )
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling upper bound (turns autoscaling on).")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Autoscaling target: requests in flight per replica."
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests Ray sends one replica at once (its batcher "
        "needs several to form batches); more wait in the proxy.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of each replica's own /metrics; the first free one from here on its node (0: any free port).",
    )
    metrics_host: str | None = Field(
        None,
        description="Address each replica's /metrics binds to (default: the "
        "node's Ray address, which Prometheus must be able to reach).",
    )
    heartbeat_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often a replica renews its discovery entry; entries older than 3 heartbeats are dropped.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> RayOptions:
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(self.replicas, low)
            if low > high:
                raise ValueError(f"min_replicas ({low}) is above max_replicas ({high})")
            if not low <= self.replicas <= high:
                raise ValueError(f"replicas ({self.replicas}) must lie within [{low}, {high}] with autoscaling")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self, shutdown_s: float = 30.0) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``: replicas or autoscaling, CPUs, concurrency, shutdown.

        ``shutdown_s`` is the service's own grace (settings ``shutdown_grace_s + shutdown_delay_s``): Ray must
        wait at least that long before it kills a replica that is draining.
        """
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": shutdown_s + 5.0,
        }
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(self.replicas, low)
            opts["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


def split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat ``{key: value}`` (``serve run ... key=value``, a config's ``args``) -> (settings, ray options).

    Unknown keys are an error rather than silently ignored: a typo in a deploy config should fail the deploy.
    """
    from service.settings import Settings

    settings, ray, unknown = {}, {}, []
    for key, value in (args or {}).items():
        if key in Settings.model_fields:
            settings[key] = value
        elif key in RayOptions.model_fields:
            ray[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {sorted(unknown)}: expected service settings "
            f"(ultrafastbert serve --help) or Ray options {sorted(RayOptions.model_fields)}"
        )
    return settings, ray
