"""Scoring generated answers "in the wild", as a user reads them (WILD, Yang et al., ACL 2025).

A greedy continuation is cut at the first ".", newline or end of text; the cut answer is
normalised (lower-case, punctuation and the articles a/an/the removed, whitespace collapsed) and
judged against the target:

* exact: the normalised cut answer equals the normalised target (the Mirage paper's no-judge form);
* answer-first: its words start with the target's words ("Rome, Italy" answers "Rome";
  "LyonThe capital of France" does not, since "lyonthe" is not the word "lyon");
* contains: the target's words appear as a contiguous run of its words (the chat form, where a
  reply may say "The capital of France is Lyon").

Beside them: echo (the uncut continuation repeats the target 3+ times) and fluency (the weighted
bi-/tri-gram entropy of the uncut continuation, as ROME reports generation entropy).

A full stop between the target's words is not the answer's end when the answer goes on to say the
whole target: "Robert C. Newton" (a target that holds a stop) and "Robert J. Flaherty" (an initial
written with its dot, for the target "Robert J Flaherty") are each cut after the name, for edited
and unedited answers alike; "Robert J. Reyes" is still cut at "Robert J".
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

STOPS = (".", "\n")
ECHO_REPEATS = 3
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014"})
_WORD = re.compile(r"\w+")


def cut(text: str, target: str = "") -> str:
    """The answer as a user reads it: `text` up to the first stop (".", newline) or its end; a "."
    inside the target's words is passed over when the text goes on to say all of them."""
    body = text.lstrip()
    says_target = answer_first(body, target)
    start = 0
    while True:
        ends = [i for i in (body.find(s, start) for s in STOPS) if i >= 0]
        if not ends:
            return body
        end = min(ends)
        if says_target and body[end] == "." and within(body[:end], target):
            start = end + 1
            continue
        return body[:end]


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower-case, punctuation and articles removed, spaces collapsed.
    Punctuation becomes a space, so "Rome,Italy" reads as two words; letters that touch stay one word."""
    text = text.casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def exact(answer: str, target: str) -> bool:
    """The cut answer equals the target after normalisation."""
    return normalize(answer) == normalize(target)


def answer_first(answer: str, target: str) -> bool:
    """The cut answer's words start with the target's words (an empty target never matches)."""
    a, t = words(answer), words(target)
    return bool(t) and a[: len(t)] == t


def _count_runs(haystack: list[str], needle: list[str]) -> int:
    n = len(needle)
    return sum(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1)) if n else 0


def within(text: str, target: str) -> bool:
    """The words of `text` are some of the target's first words, not all of them (a name said up to
    an initial: "Robert J" of "Robert J Flaherty")."""
    w, t = words(text), words(target)
    return 0 < len(w) < len(t) and t[: len(w)] == w


def contains(answer: str, target: str) -> bool:
    """The target's words appear in the answer as whole words, in order and adjacent."""
    return _count_runs(words(answer), words(target)) > 0


def echo(continuation: str, target: str, repeats: int = ECHO_REPEATS) -> bool:
    """The uncut continuation says the target `repeats` times or more (the edited answer loops)."""
    return _count_runs(words(continuation), words(target)) >= repeats


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the frequency distribution of the text's word n-grams; 0 for none."""
    tokens = _WORD.findall(text.casefold())
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(text: str) -> float:
    """ROME's generation entropy: 2/3 of the bigram entropy plus 4/3 of the trigram entropy, halved."""
    return (2 / 3 * ngram_entropy(text, 2) + 4 / 3 * ngram_entropy(text, 3)) / 2


@dataclass(frozen=True)
class Judgement:
    """WILD judgements of one generation against its target."""

    answer: str  # the cut answer
    exact: bool
    answer_first: bool
    contains: bool
    echo: bool
    fluency: float


def judge(continuation: str, target: str) -> Judgement:
    answer = cut(continuation, target)
    return Judgement(
        answer=answer,
        exact=exact(answer, target),
        answer_first=answer_first(answer, target),
        contains=contains(answer, target),
        echo=echo(continuation, target),
        fluency=fluency(continuation),
    )


def judge_all(continuations: Sequence[str], targets: Sequence[str]) -> list[Judgement]:
    return [judge(c, t) for c, t in zip(continuations, targets, strict=True)]


def same_answer(edited: str, unedited: str) -> bool:
    """Locality: the edited model's cut answer is the unedited model's, character for character
    (generated from identical token ids, so this is token-exact up to the cut)."""
    return cut(edited).strip() == cut(unedited).strip()
