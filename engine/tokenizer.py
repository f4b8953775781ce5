"""Thread-safe tokenizer on the Rust ``tokenizers`` library, with our own truncation and padding.

The library's padding and truncation are switched off once, at load time: they are per-object mutable state, and
mutating them per request from a thread pool would race. Everything request-specific (max length, truncate or
fail, direction) is done here on the id lists, which keeps :meth:`Tokenizer.encode` free of shared mutation;
``encode_batch`` itself releases the GIL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Encoding, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordPiece

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


class InputTooLongError(ValueError):
    """An input has more tokens than allowed and the caller asked not to truncate."""

    def __init__(self, index: int, n_tokens: int, max_length: int) -> None:
        super().__init__(f"input {index} has {n_tokens} tokens, more than the maximum of {max_length}")
        self.index, self.n_tokens, self.max_length = index, n_tokens, max_length


def _wordpiece_from_vocab(vocab: Path, lowercase: bool) -> HFTokenizer:
    """A BERT WordPiece tokenizer rebuilt from vocab.txt alone (older checkpoints ship no tokenizer.json)."""
    tok = HFTokenizer(WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab} has no [CLS]/[SEP] tokens")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class Tokenizer:
    """Encodes texts to id lists with [CLS]/[SEP], truncates or rejects long inputs, pads batches."""

    def __init__(self, tokenizer: HFTokenizer, files: dict[str, Path]) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._files = files  # the source files, copied verbatim by save()
        ids = (tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>"))
        self.pad_token_id: int = next((i for i in ids if i is not None), 0)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        files = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
        if "tokenizer.json" in files:
            tok = HFTokenizer.from_file(str(files["tokenizer.json"]))
        elif "vocab.txt" in files:
            lowercase = True
            if "tokenizer_config.json" in files:
                cfg = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
                lowercase = bool(cfg.get("do_lower_case", True))
            tok = _wordpiece_from_vocab(files["vocab.txt"], lowercase)
        else:
            raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.txt")
        return cls(tok, files)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: list[str], *, max_length: int, truncate: bool, direction: str = "right") -> list[list[int]]:
        """Ids with special tokens. Too long: truncate the body (``direction`` says which end is cut, the
        special tokens stay) or raise :class:`InputTooLongError` for the first offending input."""
        if direction not in ("right", "left"):
            raise ValueError(f"truncation direction must be 'right' or 'left', got {direction!r}")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        out: list[list[int]] = []
        for index, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > max_length:
                if not truncate:
                    raise InputTooLongError(index, len(ids), max_length)
                ids = _truncate(ids, enc.special_tokens_mask, max_length, direction)
            out.append(ids)
        return out

    def encodings(self, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
        """The Rust tokenizer's encodings, untruncated: ids, character offsets into each text and the special-token
        mask (``/tokenize`` reports them)."""
        return self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence: ``(input_ids, attention_mask)``, both LongTensor [B, T]."""
        width = max((len(ids) for ids in batch), default=0)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> None:
        """Copy the source files verbatim, so the saved tokenizer is byte-identical to the loaded one."""
        dest = Path(folder)
        dest.mkdir(parents=True, exist_ok=True)
        for name, src in self._files.items():
            if src.resolve() != (dest / name).resolve():
                shutil.copyfile(src, dest / name)


def _truncate(ids: list[int], special: list[int], max_length: int, direction: str) -> list[int]:
    """Keep the leading and trailing special tokens ([CLS] ... [SEP]) and cut the body to fit."""
    head = 0
    while head < len(ids) and special[head]:
        head += 1
    tail = 0
    while tail < len(ids) - head and special[len(ids) - 1 - tail]:
        tail += 1
    body = ids[head : len(ids) - tail]
    room = max(max_length - head - tail, 0)
    body = body[:room] if direction == "right" else body[len(body) - room :] if room else []
    return (ids[:head] + body + ids[len(ids) - tail :])[:max_length]
