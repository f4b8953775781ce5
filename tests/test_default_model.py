"""The shipped default model (``models/ultrafastbert-minilm-l6``): loads, is sparse, classifies, and still agrees
with its teacher (all-MiniLM-L6-v2) on a few fixed sentences. A broken or swapped file fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from register_texts import REGISTERS

from engine.checkpoint import load_model
from service.settings import DEFAULT_MODEL_PATH

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "A moving, beautifully acted film that stays with you long after the credits.",
    "The algorithm computes the greatest common divisor of two integers.",
    "Heavy rain flooded the streets of the old town overnight.",
    "This sequel is a loud, tedious mess with nothing new to say.",
]
# Measured on the shipped model (MODEL_CARD.md); the bounds leave a margin below the measured values.
MIN_MEAN_COS = 0.85  # the six sentences above: measured 0.892 (per sentence from 0.839); no FFN at all: ~0.5
MIN_EACH_COS = 0.79
MIN_REGISTER_MEAN_COS = 0.67  # per register of REGISTERS: measured 0.712 (product review) .. 0.913 (fiction)


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_MODEL_PATH / "ufb_config.json").is_file():
        pytest.fail(f"the default model is missing at {DEFAULT_MODEL_PATH}")
    return load_model(DEFAULT_MODEL_PATH)


def _embed(loaded, texts: list[str]) -> torch.Tensor:
    ids, mask = loaded.tokenizer.pad(loaded.tokenizer.encode(texts, max_length=256, truncate=True))
    with torch.inference_mode():
        return loaded.model.embed(ids, mask)


def test_shipped_folder_is_complete_and_small() -> None:
    folder = Path(DEFAULT_MODEL_PATH)
    for name in ("ufb_config.json", "model.safetensors", "MODEL_CARD.md"):
        assert (folder / name).is_file(), name
    assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 60 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_shipped_model_is_sparse_and_classifies(shipped) -> None:
    config = shipped.config
    assert config.ffn == "fff" and config.layout == "bert"
    assert len(config.dense_ffn_layers) <= 1  # a hybrid with one dense layer at most (the speed budget)
    for layer, (evaluated, dense) in enumerate(shipped.model.neurons_per_token()):
        if layer in config.dense_ffn_layers:
            assert evaluated == dense == 1536
        else:  # an FFF: at most a sixteenth of the teacher's neurons
            assert evaluated == config.fff_trees * (config.fff_depth + 1) and 16 * evaluated <= dense == 1536
    assert config.labels == ["fresh", "rotten"]
    ids, mask = shipped.tokenizer.pad(
        shipped.tokenizer.encode(
            ["A wonderful, moving and beautifully acted film.", "A boring, tedious and badly written mess."],
            max_length=64,
            truncate=True,
        )
    )
    with torch.inference_mode():
        logits = shipped.model.classify(ids, mask)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert [config.labels[i] for i in logits.argmax(1).tolist()] == ["fresh", "rotten"]


def test_shipped_embeddings_are_meaningful(shipped) -> None:
    emb = _embed(shipped, SENTENCES)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-4)
    sims = emb @ emb.T
    # the two film reviews are closer to each other than to the maths sentence
    assert sims[2, 5] > sims[2, 3] and sims[2, 5] > sims[5, 3]


def test_shipped_embeddings_stay_close_to_the_teacher(shipped, minilm_dir: Path) -> None:
    teacher = load_model(minilm_dir)
    cos = (_embed(shipped, SENTENCES) * _embed(teacher, SENTENCES)).sum(-1)
    assert float(cos.mean()) >= MIN_MEAN_COS, cos.tolist()
    assert float(cos.min()) >= MIN_EACH_COS, cos.tolist()


def test_shipped_embeddings_stay_close_to_the_teacher_in_every_register(shipped, minilm_dir: Path) -> None:
    teacher = load_model(minilm_dir)
    means = {}
    for register, texts in REGISTERS.items():
        means[register] = float((_embed(shipped, texts) * _embed(teacher, texts)).sum(-1).mean())
    assert min(means.values()) >= MIN_REGISTER_MEAN_COS, means


def test_serve_defaults_to_the_shipped_model(shipped) -> None:
    import asyncio

    from service.app import create_app
    from service.settings import Settings

    assert Settings(_env_file=None).model == DEFAULT_MODEL_PATH  # type: ignore[call-arg]

    async def go() -> None:
        from service_support import running, settings

        app = create_app(settings(DEFAULT_MODEL_PATH, warmup=False), shipped)
        async with running(app) as c:
            r = await c.post("/classify", json={"inputs": "A wonderful, moving and beautifully acted film."})
            assert r.status_code == 200, r.text
            assert r.json()[0][0]["label"] == "fresh"
            r = await c.post("/v1/embeddings", json={"input": ["hello world"], "model": "x"})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 384

    asyncio.run(go())
