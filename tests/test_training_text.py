"""How end-to-end distillation batches are drawn (engine.training.training_text): fixed packed sequences, fresh
windows of consecutive sentences, and token noise; every draw repeatable from its generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer
from engine.training.training_text import TrainingText, seeded

SENTENCES = [
    f"sentence number {i} tells of {w} and the river."
    for i, w in enumerate(
        (
            "rain",
            "music",
            "winter",
            "a market",
            "the war",
            "bridges",
            "science",
            "peace",
            "numbers",
            "a city",
            "summer",
            "memory",
        )
        * 3
    )
]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(minilm_dir)


def _pieces(tok: Tokenizer) -> list[list[int]]:
    return [seq[1:-1] for seq in tok.encode(SENTENCES, max_length=64, truncate=True)]


def _consecutive_sentences(body: list[int], pieces: list[list[int]]) -> bool:
    """``body`` is whole consecutive sentences (wrapping round the end of the text), or a cut first sentence."""
    for start in range(len(pieces)):
        joined: list[int] = []
        i = start
        while len(joined) < len(body):
            joined.extend(pieces[i % len(pieces)])
            i += 1
        if joined[: len(body)] == body and (len(joined) == len(body) or i == start + 1):
            return True
    return False


def test_fixed_sequences_are_packed_once_and_drawn_whole(tokenizer: Tokenizer) -> None:
    text = TrainingText(tokenizer, SENTENCES, 32, seed=0)
    pieces = _pieces(tokenizer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert sorted(t for c in text.chunks for t in c[1:-1]) == sorted(t for p in pieces for t in p)  # all, once
    for chunk in text.chunks:
        assert chunk[0] == cls_id and chunk[-1] == sep_id and len(chunk) <= 32
        assert _consecutive_sentences(chunk[1:-1], pieces)
    batch = text.batch(10, seeded(0, 4, 0))
    assert all(seq in text.chunks for seq in batch)
    assert batch == text.batch(10, seeded(0, 4, 0))
    assert TrainingText(tokenizer, SENTENCES, 32, seed=0).chunks == text.chunks


def test_windows_are_fresh_runs_of_consecutive_sentences(tokenizer: Tokenizer) -> None:
    text = TrainingText(tokenizer, SENTENCES, 40, seed=1, sampling="windows")
    pieces = _pieces(tokenizer)
    seen: set[tuple[int, ...]] = set()
    for step in range(20):
        batch = text.batch(8, seeded(1, 4, step))
        assert batch == text.batch(8, seeded(1, 4, step))  # repeatable: a resumed run draws the same batches
        for seq in batch:
            assert seq[0] == text.cls_id and seq[-1] == text.sep_id and len(seq) <= 40
            assert _consecutive_sentences(seq[1:-1], pieces)
            seen.add(tuple(seq))
    assert len(seen) > 0.5 * 20 * 8  # mostly new sequences, where fixed packing has only len(chunks) of them
    assert len(seen) > len(TrainingText(tokenizer, SENTENCES, 40, seed=1).chunks)


def test_token_noise_replaces_pieces_with_pieces_of_the_text(tokenizer: Tokenizer) -> None:
    clean = TrainingText(tokenizer, SENTENCES, 40, seed=2, sampling="windows")
    noisy = TrainingText(tokenizer, SENTENCES, 40, seed=2, sampling="windows", token_noise=0.3)
    vocab = {t for p in _pieces(tokenizer) for t in p}
    changed = total = 0
    for step in range(30):
        a, b = clean.batch(8, seeded(2, 4, step)), noisy.batch(8, seeded(2, 4, step))
        for x, y in zip(a, b):  # the same windows, then the noise
            assert len(x) == len(y) and x[0] == y[0] and x[-1] == y[-1]
            assert set(y[1:-1]) <= vocab
            changed += sum(u != v for u, v in zip(x[1:-1], y[1:-1]))
            total += len(x) - 2
    # 30 % drawn; a draw that lands on the same piece changes nothing (about a tenth of draws in this small text)
    assert 0.2 < changed / total < 0.33


def test_bad_options_are_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="sampling"):
        TrainingText(tokenizer, SENTENCES, 32, seed=0, sampling="shuffle")
    with pytest.raises(ValueError, match="token_noise"):
        TrainingText(tokenizer, SENTENCES, 32, seed=0, token_noise=1.0)
    with pytest.raises(ValueError, match="max_length"):
        TrainingText(tokenizer, SENTENCES, 4, seed=0)
    with pytest.raises(ValueError, match="no training text"):
        TrainingText(tokenizer, [], 32, seed=0)
