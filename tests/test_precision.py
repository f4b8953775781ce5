"""Compute precisions (engine/precision.py): CPU detection, the int8 copy of a model, and each offered precision's
fidelity to float32 on the shipped model over fixed text of six registers: sentence embeddings, the FFF trees'
routing decisions, and how much a sequence's result depends on what it is batched with."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from register_texts import REGISTERS

from engine.backend import ModelBackend, Task
from engine.checkpoint import load_model
from engine.precision import COMPUTE_DTYPES, CpuFeatures, cpu_features, is_native, quantize_int8
from loadtest import cli as loadtest_cli
from service.settings import DEFAULT_MODEL_PATH, Settings

# Bounds a little below what the shipped model measures (docs/serving.md, "Precision"); float32 is exact.
BOUNDS = {
    # min cosine to float32, mean cosine, min share of FFF leaf choices equal to float32's in any layer,
    # min cosine between a sequence embedded alone and in a batch of all the texts
    "bfloat16": {"min_cos": 0.996, "mean_cos": 0.9995, "leaves": 0.98, "batch_cos": 0.99999},
    "int8": {"min_cos": 0.975, "mean_cos": 0.99, "leaves": 0.82, "batch_cos": 0.975},
}
TEXTS = [t for texts in REGISTERS.values() for t in texts]


def test_cpu_features_and_what_is_native() -> None:
    f = cpu_features()
    assert f.capability and f.quantized_engine in torch.backends.quantized.supported_engines
    assert f.to_dict()["native_bfloat16"] == f.native_bfloat16
    none = CpuFeatures("AVX2", native_bfloat16=False, native_int8=False, quantized_engine="x86")
    amx = CpuFeatures("AVX512", native_bfloat16=True, native_int8=True, quantized_engine="x86")
    assert is_native(torch.float32, none) and not is_native(torch.bfloat16, none) and not is_native(torch.qint8, none)
    assert is_native(torch.bfloat16, amx) and is_native(torch.qint8, amx)
    assert set(COMPUTE_DTYPES) == {"float32", "bfloat16", "int8"}
    # the service's setting and the load generator's flag offer exactly these
    assert set(get_args(Settings.model_fields["compute_dtype"].annotation)) == set(COMPUTE_DTYPES)
    assert set(loadtest_cli.COMPUTE_DTYPES) == set(COMPUTE_DTYPES)


@pytest.mark.parametrize(("layout", "ffn"), [("bert", "fff"), ("crammed", "fff"), ("bert", "dense")])
def test_int8_copy_quantizes_the_dense_linears_only(layout: str, ffn: str, tmp_path, tiny_model_dir) -> None:
    from tiny_models import build_tiny_model
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    loaded = load_model(build_tiny_model(tmp_path / "tiny", layout=layout, ffn=ffn))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    q = quantize_int8(loaded.model)
    swapped = {n for n, m in q.named_modules() if isinstance(m, QLinear)}
    layers = loaded.config.num_layers
    per_layer = 2 + (2 if loaded.config.ffn == "dense" else 0)  # qkv + out (+ the dense feedforward)
    assert len(swapped) == per_layer * layers, swapped
    assert not any(isinstance(m, QLinear) for m in loaded.model.modules())  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    ids = loaded.tokenizer.encode(
        ["a short one", "and a somewhat longer sentence to embed"], max_length=64, truncate=False
    )
    fp32 = ModelBackend(loaded).forward(Task.EMBED, ids, False)[0]
    int8 = ModelBackend(loaded, compute_dtype=torch.qint8).forward(Task.EMBED, ids, False)[0]
    assert isinstance(fp32, torch.Tensor) and isinstance(int8, torch.Tensor)
    assert not torch.equal(fp32, int8) and float(F.cosine_similarity(fp32, int8).min()) > 0.95


@pytest.fixture(scope="module")
def shipped_runs() -> dict[str, tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    """Per precision: embeddings of all TEXTS in one batch, their leaves, and each text embedded alone."""
    loaded = load_model(DEFAULT_MODEL_PATH)
    ids = loaded.tokenizer.encode(TEXTS, max_length=256, truncate=False)
    runs = {}
    for name in ("float32", "bfloat16", "int8"):
        backend = ModelBackend(loaded, compute_dtype=COMPUTE_DTYPES[name])
        batch, leaves = backend.forward(Task.EMBED, ids, True)
        alone = torch.cat([backend.forward(Task.EMBED, [one], False)[0] for one in ids])  # type: ignore[misc]
        assert isinstance(batch, torch.Tensor) and leaves is not None
        runs[name] = (batch, leaves, alone)
    return runs


def test_float32_results_do_not_depend_on_the_batch(shipped_runs) -> None:
    batch, _, alone = shipped_runs["float32"]
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_precision_fidelity_to_float32_on_six_registers(name: str, shipped_runs) -> None:
    bound = BOUNDS[name]
    ref, ref_leaves, _ = shipped_runs["float32"]
    batch, leaves, alone = shipped_runs[name]
    cos = F.cosine_similarity(batch, ref)
    agree = [float((a == b).float().mean()) for a, b in zip(leaves, ref_leaves)]
    with_others = F.cosine_similarity(batch, alone)
    report = f"{name}: cos min {cos.min():.5f} mean {cos.mean():.5f}, leaves {agree}, batch {with_others.min():.6f}"
    assert not torch.equal(batch, ref), report  # the precision really ran
    assert float(cos.min()) >= bound["min_cos"] and float(cos.mean()) >= bound["mean_cos"], report
    assert min(agree) >= bound["leaves"], report
    assert float(with_others.min()) >= bound["batch_cos"], report
