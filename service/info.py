"""``GET /info``: the model, its shape and neuron usage, the kernel, every limit; TEI's keys first, so TEI clients read
it as theirs."""

from __future__ import annotations

from typing import Any

import torch

from service import __version__
from service.state import ServiceState, kernel_info


def build_info(state: ServiceState) -> dict[str, Any]:
    s = state.settings
    kernel = kernel_info()
    model: dict[str, Any] | None = None
    if state.loaded is not None:
        c = state.loaded.config
        model = {
            "name": state.model_name,
            "path": str(state.loaded.path),
            "layout": c.layout,
            "source_format": getattr(state.loaded, "source_format", None),
            "hidden_size": c.hidden_size,
            "num_layers": c.num_layers,
            "num_heads": c.num_heads,
            "ffn": c.ffn,
            "fff_trees": c.fff_trees if c.ffn == "fff" else None,
            "fff_layer_trees": {str(i): k for i, k in sorted(c.fff_layer_trees.items())},
            "fff_depth": c.fff_depth if c.ffn == "fff" else None,
            "dense_ffn_layers": c.dense_ffn_layers,
            "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings,
            "pooling": c.pooling,
            "normalize": c.normalize,
            "labels": c.labels,
            "weight_dtype": s.weight_dtype,
            "compute_dtype": s.compute_dtype,
            "compute_native": state.compute_native,
        }
    npt = [
        {"layer": i, "evaluated": e, "dense": d, "fraction": (e / d) if d else None}
        for i, (e, d) in enumerate(state.neurons_per_token)
    ]
    total_e, total_d = state.neurons_for(1)
    return {
        **tei_info(state),
        "version": __version__,
        "state": state.phase,
        "error": state.error,
        "model": model,
        "neurons_per_token": {
            "per_layer": npt,
            "evaluated": total_e,
            "dense": total_d,
            "fraction": (total_e / total_d) if total_d else None,
        },
        "cpu": state.cpu.to_dict(),
        "kernel": {
            "compiled": kernel.compiled,
            "name": kernel.name,
            "description": kernel.describe(),
            "warning": None if kernel.compiled else f"SLOW FALLBACK: {kernel.describe()}",
        },
        "limits": {
            "max_batch_tokens": s.max_batch_tokens,
            "max_batch_requests": s.max_batch_requests,
            "max_batch_wait_ms": s.max_batch_wait_ms,
            "max_queued_inputs": s.max_queued_inputs,
            "max_queued_tokens": s.max_queued_tokens,
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_inputs_per_request": s.max_inputs_per_request,
            "max_inputs_per_openai_request": s.max_inputs_per_openai_request,
            "max_input_tokens": state.max_input_tokens or s.max_input_tokens,
            "auto_truncate": s.auto_truncate,
            "payload_limit_bytes": s.payload_limit,
            "request_timeout_s": s.request_timeout_s,
            "shutdown_grace_s": s.shutdown_grace_s,
            "shutdown_delay_s": s.shutdown_delay_s,
            "keep_alive_timeout_s": s.keep_alive_timeout_s,
        },
        "inference": {
            "workers": s.inference_workers,
            "torch_threads_per_worker": (state.batcher.limits.threads_per_worker if state.batcher is not None else None)
            or torch.get_num_threads(),
        },
        "auth": {
            "api_key_required": s.api_key is not None,
            "metrics_require_key": s.api_key is not None and s.metrics_require_key,
        },
    }


def tei_info(state: ServiceState) -> dict[str, Any]:
    """TEI's ``/info`` keys (router/src/lib.rs ``Info``). ``model_type`` has one key in TEI; a model here that also
    has a classification head reports ``classifier`` beside ``embedding``, since it serves both."""
    s = state.settings
    model_type: dict[str, Any] = {}
    model_id = None
    if state.loaded is not None:
        c = state.loaded.config
        model_id = str(getattr(state.loaded, "name", None) or state.model_name)
        model_type["embedding"] = {"pooling": c.pooling}
        if c.labels:
            model_type["classifier"] = {
                "id2label": {str(i): lab for i, lab in enumerate(c.labels)},
                "label2id": {lab: i for i, lab in enumerate(c.labels)},
            }
    return {
        "model_id": model_id,
        "model_sha": None,
        "model_dtype": s.compute_dtype,
        "served_model_name": state.model_name,
        "model_type": model_type,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_input_length": state.max_input_tokens or s.max_input_tokens,
        "max_batch_tokens": s.max_batch_tokens,
        "max_batch_requests": s.max_batch_requests,
        "max_client_batch_size": s.max_inputs_per_request,
        "auto_truncate": s.auto_truncate,
        "tokenization_workers": s.tokenizer_workers,
        "sha": None,
        "docker_label": None,
    }
