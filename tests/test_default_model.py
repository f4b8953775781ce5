"""The shipped models (``models/``): the default ``ultrafastbert-minilm-l6`` (a hybrid) and the faster all-FFF
``ultrafastbert-minilm-l6-fast``. Each loads, is sparse, classifies, and still agrees with its teacher
(all-MiniLM-L6-v2) on a few fixed sentences. A broken or swapped file fails here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from register_texts import REGISTERS

from engine.checkpoint import LoadedModel, load_model
from service.settings import DEFAULT_MODEL_PATH

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "A moving, beautifully acted film that stays with you long after the credits.",
    "The algorithm computes the greatest common divisor of two integers.",
    "Heavy rain flooded the streets of the old town overnight.",
    "This sequel is a loud, tedious mess with nothing new to say.",
]


@dataclass(frozen=True)
class Shipped:
    folder: Path
    dense_layers: int  # layers that keep a dense FFN (the speed budget)
    # Bounds a margin below what the shipped file measures (its MODEL_CARD.md); no FFN at all gives ~0.5.
    min_mean_cos: float  # over SENTENCES
    min_each_cos: float
    min_register_mean_cos: float  # the worst register of REGISTERS


SHIPPED = {
    # measured 0.906 over SENTENCES (each from 0.856); registers 0.737 (product review) .. 0.931 (fiction)
    "default": Shipped(DEFAULT_MODEL_PATH, 1, 0.86, 0.80, 0.69),
    # measured 0.872 (each from 0.805); registers 0.692 (product review) .. 0.895 (fiction)
    "fast": Shipped(DEFAULT_MODEL_PATH.parent / "ultrafastbert-minilm-l6-fast", 0, 0.83, 0.76, 0.65),
}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request: pytest.FixtureRequest) -> tuple[Shipped, LoadedModel]:
    spec = SHIPPED[request.param]
    if not (spec.folder / "ufb_config.json").is_file():
        pytest.fail(f"a shipped model is missing at {spec.folder}")
    return spec, load_model(spec.folder)


def _embed(loaded, texts: list[str]) -> torch.Tensor:
    ids, mask = loaded.tokenizer.pad(loaded.tokenizer.encode(texts, max_length=256, truncate=True))
    with torch.inference_mode():
        return loaded.model.embed(ids, mask)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_folder_is_complete_and_small(name: str) -> None:
    folder = SHIPPED[name].folder
    for file in ("ufb_config.json", "model.safetensors", "MODEL_CARD.md", "eval.json"):
        assert (folder / file).is_file(), file
    assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 60 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_shipped_model_is_sparse_and_classifies(shipped: tuple[Shipped, LoadedModel]) -> None:
    spec, loaded = shipped
    config = loaded.config
    assert config.ffn == "fff" and config.layout == "bert"
    assert len(config.dense_ffn_layers) == spec.dense_layers
    for layer, (evaluated, dense) in enumerate(loaded.model.neurons_per_token()):
        if layer in config.dense_ffn_layers:
            assert evaluated == dense == 1536
        else:  # an FFF: at most a sixteenth of the teacher's neurons
            assert evaluated == config.fff_trees * (config.fff_depth + 1) and 16 * evaluated <= dense == 1536
    assert config.labels == ["fresh", "rotten"]
    ids, mask = loaded.tokenizer.pad(
        loaded.tokenizer.encode(
            ["A wonderful, moving and beautifully acted film.", "A boring, tedious and badly written mess."],
            max_length=64,
            truncate=True,
        )
    )
    with torch.inference_mode():
        logits = loaded.model.classify(ids, mask)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert [config.labels[i] for i in logits.argmax(1).tolist()] == ["fresh", "rotten"]


def test_shipped_embeddings_are_meaningful(shipped: tuple[Shipped, LoadedModel]) -> None:
    emb = _embed(shipped[1], SENTENCES)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-4)
    sims = emb @ emb.T
    # the two film reviews are closer to each other than to the maths sentence
    assert sims[2, 5] > sims[2, 3] and sims[2, 5] > sims[5, 3]


def test_shipped_embeddings_stay_close_to_the_teacher(shipped: tuple[Shipped, LoadedModel], minilm_dir: Path) -> None:
    spec, loaded = shipped
    teacher = load_model(minilm_dir)
    cos = (_embed(loaded, SENTENCES) * _embed(teacher, SENTENCES)).sum(-1)
    assert float(cos.mean()) >= spec.min_mean_cos, cos.tolist()
    assert float(cos.min()) >= spec.min_each_cos, cos.tolist()


def _register_means(loaded: LoadedModel, teacher: LoadedModel) -> dict[str, float]:
    return {r: float((_embed(loaded, t) * _embed(teacher, t)).sum(-1).mean()) for r, t in REGISTERS.items()}


def test_shipped_embeddings_stay_close_to_the_teacher_in_every_register(
    shipped: tuple[Shipped, LoadedModel], minilm_dir: Path
) -> None:
    spec, loaded = shipped
    means = _register_means(loaded, load_model(minilm_dir))
    assert min(means.values()) >= spec.min_register_mean_cos, means


def test_the_default_is_the_more_faithful_on_its_worst_register(minilm_dir: Path) -> None:
    """The issue's rule: the default is the most faithful point within the speed budget; the fast model trades
    fidelity for speed."""
    teacher = load_model(minilm_dir)
    worst = {name: min(_register_means(load_model(s.folder), teacher).values()) for name, s in SHIPPED.items()}
    assert worst["default"] > worst["fast"], worst


def test_each_serves_under_its_name_and_serve_defaults_to_the_default(shipped: tuple[Shipped, LoadedModel]) -> None:
    import asyncio

    from service.app import create_app
    from service.settings import Settings

    spec, loaded = shipped
    assert Settings(_env_file=None).model == DEFAULT_MODEL_PATH  # type: ignore[call-arg]

    async def go() -> None:
        from service_support import running, settings

        app = create_app(settings(spec.folder, warmup=False), loaded)
        async with running(app) as c:
            r = await c.post("/classify", json={"inputs": "A wonderful, moving and beautifully acted film."})
            assert r.status_code == 200, r.text
            assert r.json()[0][0]["label"] == "fresh"
            r = await c.post("/v1/embeddings", json={"input": ["hello world"], "model": "x"})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 384
            assert r.json()["model"] == spec.folder.name  # each folder serves under its own name

    asyncio.run(go())
