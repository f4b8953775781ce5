"""Compute precisions beside float32: what this CPU does in hardware, and int8 dynamic quantization.

* ``bfloat16``: torch.autocast runs the linears and attention in bf16 (engine.backend). Native with AMX or
  AVX-512-BF16; elsewhere oneDNN emulates it, slower than float32.
* ``int8``: the encoder's dense linears (the attention projections, and a dense model's feedforward) become
  dynamically quantized ``qint8`` linears: int8 weights per output channel, activations quantized per batch.
  The FFF kernel, embeddings, LayerNorms, pooling and heads stay float32. Because an activation's scale is taken
  over the whole packed batch, a sequence's result depends slightly on what it is batched with; the bound is
  tested (tests/test_precision.py) and stated in docs/serving.md.

Neither is a default: both stay below the 0.9995 cosine to float32 that a default needs (docs/serving.md).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.qint8}


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers the compute dtypes, as torch sees it."""

    capability: str  # torch's kernel dispatch level: DEFAULT, AVX2, AVX512, ...
    native_bfloat16: bool  # AMX tiles or AVX-512-BF16
    native_int8: bool  # VNNI (AVX-512 or AVX) dot products, which int8 GEMMs use
    quantized_engine: str  # torch.backends.quantized.engine (x86 / fbgemm / onednn / qnnpack)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe(name: str) -> bool:
    fn = getattr(getattr(torch, "cpu", None), name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def cpu_features() -> CpuFeatures:
    return CpuFeatures(
        capability=str(torch.backends.cpu.get_cpu_capability()),
        native_bfloat16=_probe("_is_amx_tile_supported") or _probe("_is_avx512_bf16_supported"),
        native_int8=_probe("_is_vnni_supported") or _probe("_is_amx_tile_supported"),
        quantized_engine=str(torch.backends.quantized.engine),
    )


def is_native(compute_dtype: torch.dtype, features: CpuFeatures | None = None) -> bool:
    """Whether ``compute_dtype`` runs in hardware here (float32 always does)."""
    f = features or cpu_features()
    if compute_dtype == torch.bfloat16:
        return f.native_bfloat16
    if compute_dtype == torch.qint8:
        return f.native_int8
    return True


def quantize_int8(model: M) -> M:
    """A copy of ``model`` whose dense linears run as dynamically quantized int8 (``model`` is left as it is).

    Quantized: every attention's q/k/v projection (as one fused linear) and output projection, and a dense
    model's feedforward. Kept float32: FFFs (their kernel), embeddings, norms, pooler and classifier."""
    from engine.layers import DenseFFN, SelfAttention

    quantized = copy.deepcopy(model).eval()
    names: set[str] = set()
    for name, module in quantized.named_modules():
        if isinstance(module, SelfAttention):
            module.use_fused_projection()
            names.update({f"{name}.qkv_module", f"{name}.out"})
        elif isinstance(module, DenseFFN):
            names.update({f"{name}.dense_in", f"{name}.dense_out"})
    with torch.no_grad():
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(quantized, {n: qconfig for n in names}, inplace=True)
    return quantized
