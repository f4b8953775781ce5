"""The tokenised distillation text, and how end-to-end training batches are drawn from it.

Why this is more than a list of sequences: the student fits the text it trains on better than it generalises (the
shipped student agreed with its teacher at 0.90-0.91 on training sentences and 0.89 on held-out ones, model card),
and the offline text is small (2.3 M tokens). The teacher labels whatever it is given, so the inputs need not be
the same sequences over and over:

* ``sampling="fixed"``: the text is packed once into sequences of whole consecutive sentences (random target length
  8 .. ``max_length`` tokens with [CLS] and [SEP]), and each batch draws some of them: a sequence recurs exactly
  every time it is drawn (the recipe of the shipped model's stages 1-4).
* ``sampling="windows"``: each batch builds fresh sequences: a random sentence to start from and a random target
  length, then whole consecutive sentences while they fit (a longer first sentence is cut). The same sentences recur,
  but almost never in the same context, so the student cannot learn the sequences by heart.
* ``token_noise=p``: each word piece (never [CLS] or [SEP]) is replaced, with probability p, by a piece drawn from
  the training text's own piece frequencies: inputs near, not on, the training text, labelled by the teacher.

Every draw comes from the caller's generator, so a run resumed from a checkpoint draws the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.tokenizer import Tokenizer

SAMPLINGS = ("fixed", "windows")
MIN_SEQUENCE = 8  # tokens, [CLS] and [SEP] included


def seeded(seed: int, *parts: int) -> torch.Generator:
    """A generator for one named draw of a run (``parts``: phase, layer, step ...), independent of the others."""
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2**62)
    return torch.Generator().manual_seed(value)


class TrainingText:
    def __init__(
        self,
        tokenizer: Tokenizer,
        texts: Sequence[str],
        max_length: int,
        seed: int,
        *,
        sampling: str = "fixed",
        token_noise: float = 0.0,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 0.0 <= token_noise < 1.0:
            raise ValueError(f"token_noise must be in [0, 1), got {token_noise}")
        if max_length < MIN_SEQUENCE:
            raise ValueError(f"max_length must be at least {MIN_SEQUENCE}, got {max_length}")
        ids = tokenizer.encode(list(texts), max_length=max_length, truncate=True)
        if not ids:
            raise ValueError("no training text")
        self.cls_id, self.sep_id = ids[0][0], ids[0][-1]
        self.max_length = max_length
        self.sampling = sampling
        self.token_noise = token_noise
        self.pieces = [seq[1:-1] for seq in ids if len(seq) > 2]  # document order: neighbours are neighbours
        if not self.pieces:
            raise ValueError("the training text has no tokens")
        self.chunks = self._pack(torch.Generator().manual_seed(seed), seeded(seed, 1))
        self.frequencies = torch.bincount(
            torch.tensor([t for p in self.pieces for t in p]), minlength=tokenizer.vocab_size
        ).double()

    def _wrap(self, body: list[int]) -> list[int]:
        return [self.cls_id] + body[: self.max_length - 2] + [self.sep_id]

    def _target(self, gen: torch.Generator) -> int:
        return int(torch.randint(MIN_SEQUENCE, self.max_length + 1, (1,), generator=gen))

    def _pack(self, gen: torch.Generator, order_gen: torch.Generator) -> list[list[int]]:
        """The fixed sequences, shuffled (the same draws as the recipe of the shipped model's stages)."""
        chunks: list[list[int]] = []
        body: list[int] = []
        target = self._target(gen)
        for piece in self.pieces:
            if body and len(body) + len(piece) > target - 2:
                chunks.append(self._wrap(body))
                body = []
                target = self._target(gen)
            body.extend(piece)
        if body:
            chunks.append(self._wrap(body))
        order = torch.randperm(len(chunks), generator=order_gen).tolist()
        return [chunks[i] for i in order]

    def _window(self, start: int, target: int) -> list[int]:
        body = list(self.pieces[start])
        i = start + 1
        while i - start < len(self.pieces):
            nxt = self.pieces[i % len(self.pieces)]
            if len(body) + len(nxt) > target - 2:
                break
            body.extend(nxt)
            i += 1
        return self._wrap(body[: target - 2])

    def _noised(self, seq: list[int], gen: torch.Generator) -> list[int]:
        n = len(seq) - 2
        hit = (torch.rand(n, generator=gen) < self.token_noise).nonzero().squeeze(1)
        if hit.numel() == 0:
            return seq
        out = list(seq)
        for pos, tok in zip(
            hit.tolist(), torch.multinomial(self.frequencies, hit.numel(), replacement=True, generator=gen).tolist()
        ):
            out[1 + pos] = tok
        return out

    def batch(self, size: int, gen: torch.Generator) -> list[list[int]]:
        """``size`` token sequences ([CLS] ... [SEP]), drawn with ``gen``."""
        if self.sampling == "fixed":
            seqs = [self.chunks[i] for i in torch.randint(0, len(self.chunks), (size,), generator=gen).tolist()]
        else:
            starts = torch.randint(0, len(self.pieces), (size,), generator=gen).tolist()
            targets = torch.randint(MIN_SEQUENCE, self.max_length + 1, (size,), generator=gen).tolist()
            seqs = [self._window(s, t) for s, t in zip(starts, targets)]
        if self.token_noise:
            seqs = [self._noised(s, gen) for s in seqs]
        return seqs


REGISTER_WEIGHTINGS = ("tokens", "sqrt", "equal")


class CorpusText:
    """Training batches drawn from a built corpus (:mod:`engine.training.corpus`) through a memory map.

    A batch draws a length cap; then, per sequence, a register (with probability by ``weighting``: ``tokens`` as the
    text has, ``sqrt`` of its tokens, so small registers are drawn more often than their size alone gives, or
    ``equal``), a sentence of that register, and a target length between half the cap and the cap; then whole
    consecutive sentences of the same document while they fit (a longer first sentence is cut). Nothing is held in
    memory but the index of sentences."""

    def __init__(
        self,
        corpus: str,
        max_length: int,
        seed: int,
        *,
        cls_id: int,
        sep_id: int,
        weighting: str = "sqrt",
        token_noise: float = 0.0,
        vocab_size: int | None = None,
    ) -> None:
        import numpy as np

        from engine.training.corpus import SENTENCES_FILE, TOKENS_FILE, load_report

        if weighting not in REGISTER_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {REGISTER_WEIGHTINGS}, got {weighting!r}")
        if max_length < MIN_SEQUENCE:
            raise ValueError(f"max_length must be at least {MIN_SEQUENCE}, got {max_length}")
        if not 0.0 <= token_noise < 1.0:
            raise ValueError(f"token_noise must be in [0, 1), got {token_noise}")
        report = load_report(corpus)
        self.tokens = np.memmap(f"{corpus}/{TOKENS_FILE}", dtype=np.uint16, mode="r")
        self.index = np.fromfile(f"{corpus}/{SENTENCES_FILE}", dtype=np.int64).reshape(-1, 3)
        if not len(self.index):
            raise ValueError(f"{corpus} has no training sentences")
        ranges: dict[str, list[tuple[int, int]]] = {}
        for src in report["sources"].values():
            lo, hi = src["train_sentences_range"]
            if hi > lo:
                ranges.setdefault(src["register"], []).append((lo, hi))
        self.registers = sorted(ranges)
        self.ranges = [ranges[r] for r in self.registers]
        sizes = [report["registers"][r]["train"]["tokens"] for r in self.registers]
        power = {"tokens": 1.0, "sqrt": 0.5, "equal": 0.0}[weighting]
        weights = torch.tensor([float(s) ** power for s in sizes], dtype=torch.double)
        self.register_weights = weights / weights.sum()
        self.cls_id, self.sep_id = cls_id, sep_id
        self.max_length = max_length
        self.token_noise = token_noise
        self.frequencies = None
        if token_noise:
            self.frequencies = torch.from_numpy(np.bincount(self.tokens, minlength=vocab_size or 0)).double()
        self.chunks = self.batch(4096, seeded(seed, 5))  # a fixed sample: what the layer-wise phase caches

    def _sentence(self, gen: torch.Generator) -> int:
        reg = int(torch.multinomial(self.register_weights, 1, generator=gen))
        spans = self.ranges[reg]
        sizes = torch.tensor([hi - lo for lo, hi in spans], dtype=torch.double)
        lo, hi = spans[int(torch.multinomial(sizes, 1, generator=gen))]
        return lo + int(torch.randint(0, hi - lo, (1,), generator=gen))

    def _window(self, start: int, target: int) -> list[int]:
        off, n, doc = (int(v) for v in self.index[start])
        body = self.tokens[off : off + n].tolist()
        i = start + 1
        while i < len(self.index) and int(self.index[i, 2]) == doc:
            off, n, _ = (int(v) for v in self.index[i])
            if len(body) + n > target - 2:
                break
            body.extend(self.tokens[off : off + n].tolist())
            i += 1
        return [self.cls_id] + body[: target - 2] + [self.sep_id]

    def _noised(self, seq: list[int], gen: torch.Generator) -> list[int]:
        assert self.frequencies is not None
        hit = (torch.rand(len(seq) - 2, generator=gen) < self.token_noise).nonzero().squeeze(1)
        out = list(seq)
        for pos, tok in zip(
            hit.tolist(),
            torch.multinomial(self.frequencies, max(1, hit.numel()), replacement=True, generator=gen).tolist(),
        ):
            out[1 + pos] = tok
        return out

    def batch(self, size: int, gen: torch.Generator) -> list[list[int]]:
        """``size`` token sequences ([CLS] ... [SEP]), drawn with ``gen``."""
        # One length cap per batch, each sequence's target between half of it and it: lengths still vary from
        # MIN_SEQUENCE to max_length across batches, but a padded batch wastes little on padding.
        cap = int(torch.randint(MIN_SEQUENCE, self.max_length + 1, (1,), generator=gen))
        seqs = []
        for _ in range(size):
            start = self._sentence(gen)
            target = int(torch.randint(max(MIN_SEQUENCE, cap // 2), cap + 1, (1,), generator=gen))
            seqs.append(self._window(start, target))
        if self.token_noise:
            seqs = [self._noised(s, gen) for s in seqs]
        return seqs
