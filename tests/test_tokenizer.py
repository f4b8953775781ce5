"""The tokenizer: truncation in both directions keeps the special tokens, padding, the vocab.txt fallback, threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine.tokenizer import InputTooLongError, Tokenizer

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(minilm_dir)


def test_tokenizer_truncates_both_directions_keeping_special_tokens(tokenizer: Tokenizer) -> None:
    text = "one two three four five six seven eight"
    full = tokenizer.encode([text], max_length=512, truncate=False)[0]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert full[0] == cls and full[-1] == sep and len(full) == 10
    right = tokenizer.encode([text], max_length=5, truncate=True)[0]
    left = tokenizer.encode([text], max_length=5, truncate=True, direction="left")[0]
    assert right == [cls] + full[1:4] + [sep]
    assert left == [cls] + full[-4:-1] + [sep]
    assert tokenizer.decode(right) == "one two three"
    assert tokenizer.convert_ids_to_tokens(left) == ["[CLS]", "six", "seven", "eight", "[SEP]"]
    with pytest.raises(InputTooLongError) as info:
        tokenizer.encode(["short", text], max_length=5, truncate=False)
    assert (info.value.index, info.value.n_tokens, info.value.max_length) == (1, 10, 5)


def test_tokenizer_pad_and_vocab_txt_fallback(tokenizer: Tokenizer, minilm_dir: Path, tmp_path: Path) -> None:
    batch = tokenizer.encode(["hello world", "hi"], max_length=16, truncate=False)
    ids, mask = tokenizer.pad(batch)
    assert ids.dtype == torch.long and ids.shape == (2, 4)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]] and ids[1, 3] == tokenizer.pad_token_id
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    from_vocab = Tokenizer.from_folder(tmp_path)
    texts = ["Hello, World! Ünïcode café", "tokenization of unusualwords"]
    assert from_vocab.encode(texts, max_length=64, truncate=False) == tokenizer.encode(
        texts, max_length=64, truncate=False
    )
    assert from_vocab.vocab_size == tokenizer.vocab_size == 30522


def test_tokenizer_is_thread_safe(tokenizer: Tokenizer) -> None:
    texts = [f"sentence number {i} " + "word " * (i % 40) for i in range(64)]
    expected = [
        tokenizer.encode([t], max_length=16 + i % 5, truncate=True, direction="left" if i % 2 else "right")
        for i, t in enumerate(texts)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(
            pool.map(
                lambda it: tokenizer.encode(
                    [it[1]], max_length=16 + it[0] % 5, truncate=True, direction="left" if it[0] % 2 else "right"
                ),
                list(enumerate(texts)) * 4,
            )
        )
    assert got == expected * 4
