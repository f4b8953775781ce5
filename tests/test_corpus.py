"""The multi-register corpus (engine.training.corpus) on small made-up sources, and how training batches are drawn
from it (engine.training.training_text.CorpusText): registers counted, duplicates removed, held-out text disjoint
from training text, whole registers held out, deterministic builds, batches from training documents only."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.training import corpus as C
from engine.training.training_text import CorpusText, seeded

TOPICS = ("river", "market", "winter", "engine", "garden", "violin", "harbour", "library", "mountain", "kitchen")


def _doc(topic: str, i: int, n: int = 4) -> str:
    return "\n".join(
        f"The {topic} number {i} had story line {j} about the {TOPICS[(i + j) % len(TOPICS)]} today." for j in range(n)
    )


def _news(root: Path) -> Iterator[tuple[str, str]]:
    for i in range(60):
        yield f"n{i}", _doc("newspaper", i)
    yield "dup-within", _doc("newspaper", 3)  # an exact copy of an earlier document


def _reviews(root: Path) -> Iterator[tuple[str, str]]:
    for i in range(40):
        yield f"r{i}", _doc("film", i, 3) + "\nTHE NEWSPAPER NUMBER 5 HAD STORY LINE 0 ABOUT THE VIOLIN TODAY!"
    yield "heldout/forced", "This review is always held out because its key says so, whatever the hash."
    yield "junk", "12 34 56 78 90 ## ## ##\nok"  # nothing sentence-like: dropped


def _questions(root: Path) -> Iterator[tuple[str, str]]:
    for i in range(10):
        yield (
            f"q{i}",
            (
                f"How does question {i} about the {TOPICS[i]} work? "
                f"It works by answering the {TOPICS[i]} questions well."
            ),
        )


def _sources() -> list[C.Source]:
    pkg = C.Package("pypi", "none", "0")
    return [
        C.Source("news-a", "news", pkg, "test", _news, holdout=0.2),
        C.Source("reviews-a", "reviews", pkg, "test", _reviews, holdout=0.2),
        C.Source("faq-a", "questions", pkg, "test", _questions, heldout_only=True),
    ]


def _sentences(folder: Path) -> list[str]:
    return [line for f in sorted(folder.glob("*.txt")) for line in f.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def built(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus") / "c"
    roots = {s.name: out for s in _sources()}
    return out, C.build(out, _sources(), minilm_dir, roots=roots)


def test_registers_are_counted_and_a_whole_register_is_held_out(built: tuple[Path, dict]) -> None:
    out, report = built
    assert set(report["registers"]) == {"news", "reviews", "questions"}
    assert report["registers"]["questions"]["train"]["sentences"] == 0
    assert report["registers"]["questions"]["heldout"]["sentences"] == 20
    for name in ("news", "reviews"):
        r = report["registers"][name]
        assert r["train"]["documents"] > 0 and r["heldout"]["documents"] > 0
    assert report["total"]["train"] == sum(r["train"]["tokens"] for r in report["registers"].values())
    assert json.loads((out / C.REPORT_FILE).read_text()) == report
    table = C.format_report(report)
    assert "questions" in table and f"{report['total']['train']:,}" in table


def test_duplicates_are_removed_across_sources_and_documents(built: tuple[Path, dict]) -> None:
    out, report = built
    every = _sentences(out / "train") + _sentences(out / "heldout")
    folded = [C.sentence_hash(s) for s in every]
    assert len(folded) == len(set(folded))
    # the copied document and the upper-case copy of a news sentence in every review were dropped
    assert (
        report["sources"]["news-a"]["train"]["duplicates"] + report["sources"]["news-a"]["heldout"]["duplicates"] == 4
    )
    assert sum(report["sources"]["reviews-a"][side]["duplicates"] for side in ("train", "heldout")) == 40
    assert not any("##" in s for s in every)


def test_heldout_text_is_disjoint_and_documents_stay_whole(built: tuple[Path, dict]) -> None:
    out, _ = built
    train, held = set(_sentences(out / "train")), set(_sentences(out / "heldout"))
    assert train and held and not train & held
    assert "This review is always held out because its key says so, whatever the hash." in held
    for doc in C.heldout_documents(out, "news-a"):  # every sentence of a held-out document is held out
        number = doc[0].split(" number ")[1].split()[0]
        assert not any(f"newspaper number {number} had" in s for s in train)


def test_token_store_matches_the_training_text(built: tuple[Path, dict], minilm_dir: Path) -> None:
    from engine.tokenizer import Tokenizer

    out, report = built
    tokens = np.fromfile(out / C.TOKENS_FILE, dtype=np.uint16)
    index = np.fromfile(out / C.SENTENCES_FILE, dtype=np.int64).reshape(-1, 3)
    train = []
    for name in ("news-a", "reviews-a", "faq-a"):
        train += [line for line in (out / "train" / f"{name}.txt").read_text().splitlines() if line]
    assert len(index) == len(train) and int(index[:, 1].sum()) == len(tokens) == report["total"]["train"]
    tok = Tokenizer.from_folder(minilm_dir)
    for row, sentence in zip(index[::7], train[::7]):
        off, n, _ = (int(v) for v in row)
        assert tokens[off : off + n].tolist() == tok.encode([sentence], max_length=512, truncate=True)[0][1:-1]
    assert np.all(np.diff(index[:, 2]) >= 0)  # documents are numbered in order


def test_a_build_is_reproducible(built: tuple[Path, dict], minilm_dir: Path, tmp_path: Path) -> None:
    out, report = built
    again = tmp_path / "again"
    assert C.build(again, _sources(), minilm_dir, roots={s.name: again for s in _sources()}) == report
    for name in (C.TOKENS_FILE, C.SENTENCES_FILE, "train/news-a.txt", "heldout/reviews-a.txt"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_batches_come_from_training_documents_only(built: tuple[Path, dict], minilm_dir: Path) -> None:
    from engine.tokenizer import Tokenizer

    out, _ = built
    tok = Tokenizer.from_folder(minilm_dir)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    text = CorpusText(str(out), 40, seed=0, cls_id=cls, sep_id=sep, weighting="equal")
    assert text.registers == ["news", "reviews"]  # the held-out-only register has no training text
    held_docs = set(re.findall(r"(newspaper|film) number (\d+) ", " ".join(_sentences(out / "heldout"))))
    assert held_docs
    batch = text.batch(64, seeded(1, 4, 0))
    assert batch == text.batch(64, seeded(1, 4, 0))  # the generator decides everything
    assert batch != text.batch(64, seeded(1, 4, 1))
    for seq in batch:
        assert seq[0] == cls and seq[-1] == sep and 3 <= len(seq) <= 40
        docs = set(re.findall(r"(newspaper|film) number (\d+) ", tok.decode(seq)))
        assert len(docs) <= 1  # consecutive sentences of one document, never across documents
        assert not docs & held_docs
    films = sum("film" in tok.decode(s) for s in text.batch(400, seeded(2)))
    assert 140 < films < 260  # equal weighting: half of the draws from each register


def test_corpus_text_rejects_bad_arguments(built: tuple[Path, dict]) -> None:
    out, _ = built
    with pytest.raises(ValueError, match="weighting"):
        CorpusText(str(out), 40, 0, cls_id=1, sep_id=2, weighting="loud")
    with pytest.raises(ValueError, match="max_length"):
        CorpusText(str(out), 4, 0, cls_id=1, sep_id=2)


def test_sentence_rules() -> None:
    assert C.split_sentences("One sentence here. Another one follows!\nA new paragraph (really).") == [
        "One sentence here.",
        "Another one follows!",
        "A new paragraph (really).",
    ]
    assert C.is_english_sentence("The cat sat on the mat all afternoon.")
    assert not C.is_english_sentence("too short")
    assert not C.is_english_sentence("1234 5678 9012 3456 7890 1234 5678")
    assert not C.is_english_sentence("Это предложение написано по-русски, а не по-английски.")
    assert C.sentence_hash("Hello, World!") == C.sentence_hash("hello world")
    assert C.sentence_hash("hello world") != C.sentence_hash("hello word")


def test_html_and_source_readers(tmp_path: Path) -> None:
    from engine.training import sources as S

    text = S.html_text(
        "<html><head><title>x</title></head><body><nav>Skip me</nav><p>First <b>bold</b> "
        "paragraph.</p><pre>code = 1</pre><ul><li>An item.</li></ul><script>var a;</script></body>"
    )
    assert text.splitlines() == ["First bold paragraph.", "An item."]
    assert {s.register for s in S.SOURCES} >= {
        "encyclopedic",
        "news",
        "fiction",
        "reviews",
        "email",
        "technical",
        "definitions",
        "questions-answers",
    }
    assert len({s.name for s in S.SOURCES}) == len(S.SOURCES)
    assert any(s.heldout_only for s in S.SOURCES)
    wn = tmp_path / "usr/share/wordnet"
    wn.mkdir(parents=True)
    (wn / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the "
        'genus Canis; "the dog barked all night"\n'
    )
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    assert list(S.wordnet_glosses(tmp_path)) == [
        ("noun:02084071", "Dog: a member of the genus Canis.\nThe dog barked all night.")
    ]
