"""The offline text behind distillation and evaluation (engine.training.text_data): held-out text never leaks into
training text, and the extended corpus adds clean prose (no speaker tags, stage directions or CSV debris)."""

from __future__ import annotations

import re

import pytest

from engine.training import text_data


@pytest.fixture(scope="module")
def standard() -> list[str]:
    return text_data.distillation_texts()


def test_held_out_text_never_reaches_training(standard: list[str]) -> None:
    train = set(standard)
    held = text_data.heldout_sentences(600)
    assert len(held) == 600
    assert not train & set(held)
    assert not train & set(text_data.rotten_tomatoes("test").texts)
    assert not train & set(text_data.lee_documents()[0])


def test_extended_corpus_adds_speeches_and_shakespeare(standard: list[str]) -> None:
    extended = text_data.distillation_texts("extended")
    assert extended[: len(standard)] == standard
    added = extended[len(standard) :]
    speeches, plays = text_data.speeches(), text_data.shakespeare()
    assert added == speeches + plays
    # measured: 14,005 speech sentences (1.2 MB) and 45,437 Shakespeare sentences (4.4 MB)
    assert len(speeches) > 10_000 and len(plays) > 40_000
    assert not set(added) & set(text_data.heldout_sentences(600))
    assert any("Thank you so much" in s for s in speeches)
    assert any(s.startswith("To be, or not to be") for s in plays)


def test_shakespeare_drops_speaker_tags_and_stage_directions() -> None:
    plays = text_data.shakespeare()
    assert not [s for s in plays if "[" in s or "]" in s]  # "[Exit Ghost.]", also across lines
    assert not [s for s in plays if re.fullmatch(r"\w+\.", s)]  # "Hor." on its own
    # "LYSANDER How now", "FIRST LORD. Is it": gone, bar a few scene headings ("CAESAR'S camp in Egypt.")
    capitals = [s for s in plays if re.match(r"[A-Z][A-Z']+(?: [A-Z][A-Z']+)*\.? ", s)]
    assert len(capitals) < 0.002 * len(plays), capitals[:10]
    assert not [s for s in plays if "Gutenberg" in s or "gutenberg" in s]
    assert min(map(len, plays)) >= 20


def test_unknown_corpus_is_refused() -> None:
    with pytest.raises(ValueError, match="corpus"):
        text_data.distillation_texts("everything")
