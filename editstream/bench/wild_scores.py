"""The quality benchmark's WILD half: score a chunk of edits by greedy generation, as a user reads it.

Per edit, after all edits of its chunk were applied:

* reliability / generality: greedy `tokens` new tokens on the prompt / every paraphrase, cut at the
  first ".", newline or end of text, judged answer-first and exact (`editstream.wild`);
* reliability_retrieved: the same on the prompt with the exact-prompt lookup off, so the edit must
  be found by the retriever or router itself;
* locality / subject locality: the cut answer on the locality prompt / on held-out prompts about the
  edited subject (probes.SUBJECT_PROBES) equals the unedited model's cut answer;
* echo (the 50-token continuation of the prompt repeats the target 3+ times) and fluency (its
  n-gram entropy beside the unedited model's on the same prompt); for scale, how often the unedited
  model's own continuation of the prompt repeats its own cut answer 3+ times (echo_unedited_own);
* chat (question data): the prompt and paraphrase as the user turn of the chat template, judged by
  whether the cut reply contains the target as whole words; the prompt's also with the exact-prompt
  lookup off (chat_reliability_retrieved), as for reliability.

Unedited generations are made once per run (`unedited_wild`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm import tqdm

from editstream import wild
from editstream.edits import EditRequest
from editstream.probes import SUBJECT_PROBES
from editstream.replica import Replica


@dataclass
class WildBase:
    """The unedited model's generations on every probe of the run, keyed by prompt."""

    cut_answers: dict[str, str]  # locality and subject prompts -> cut answer
    fluency: dict[str, float]  # edit prompts -> entropy of the unedited continuation
    echo_own: dict[str, bool]  # edit prompts -> the unedited continuation repeats its own answer 3+ times


@dataclass
class WildScores:
    """Per-row WILD results of one or more chunks (extend to aggregate)."""

    reliability: list[float] = field(default_factory=list)
    generality: list[float] = field(default_factory=list)
    exact_reliability: list[float] = field(default_factory=list)
    exact_generality: list[float] = field(default_factory=list)
    reliability_retrieved: list[float] = field(default_factory=list)
    locality: list[float] = field(default_factory=list)
    subject_locality: list[float] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)
    fluency: list[float] = field(default_factory=list)
    fluency_unedited: list[float] = field(default_factory=list)
    echo_unedited_own: list[float] = field(default_factory=list)
    chat_reliability: list[float] = field(default_factory=list)
    chat_generality: list[float] = field(default_factory=list)
    chat_reliability_retrieved: list[float] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)
    misses: list[dict[str, str]] = field(default_factory=list)  # served answers that failed answer-first

    def extend(self, other: WildScores) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))


def subject_prompts(edits: Sequence[EditRequest]) -> list[str]:
    return [t.format(e.subject) for e in edits if e.subject for t in SUBJECT_PROBES]


def locality_prompts(edits: Sequence[EditRequest]) -> list[str]:
    return [p.prompt for e in edits for p in e.locality]


def _batched(replica: Replica, prompts: Sequence[str], batch: int, **kwargs) -> list:
    out = []
    steps = range(0, len(prompts), batch)
    for i in tqdm(steps, desc="WILD generations", unit="batch", leave=False, disable=len(steps) < 4):
        out += replica.generate(list(prompts[i : i + batch]), **kwargs)
    return out


def unedited_wild(replica: Replica, edits: Sequence[EditRequest], tokens: int, batch: int = 64) -> WildBase:
    """The unedited model's cut answers on locality and subject probes and its fluency on edit prompts."""
    probes = sorted(set(locality_prompts(edits) + subject_prompts(edits)))
    answers = _batched(replica, probes, batch, max_new_tokens=tokens, edited=False, until_cut=True)
    prompts = [e.prompt for e in edits]
    plain = _batched(replica, prompts, batch, max_new_tokens=tokens, edited=False)
    return WildBase(
        cut_answers={p: a.text for p, a in zip(probes, answers, strict=True)},
        fluency={p: wild.fluency(a.text) for p, a in zip(prompts, plain, strict=True)},
        echo_own={
            p: bool(wild.cut(a.text)) and wild.echo(a.text, wild.cut(a.text))
            for p, a in zip(prompts, plain, strict=True)
        },
    )


def _replies_contain(answers: Sequence, targets: Sequence[str]) -> list[float]:
    return [float(wild.contains(wild.cut(a.text, t), t)) for a, t in zip(answers, targets, strict=True)]


@contextmanager
def searched(replica: Replica) -> Iterator[None]:
    """The exact-prompt lookup off for the block: every edit must be found by the retriever."""
    before, replica.method.exact_lookup = replica.method.exact_lookup, False
    try:
        yield
    finally:
        replica.method.exact_lookup = before


def is_question_set(edits: Sequence[EditRequest]) -> bool:
    """Whether most prompts are questions (then the chat form is scored too)."""
    return sum(e.is_question for e in edits) * 2 > len(edits)


def score_wild_chunk(
    replica: Replica,
    edits: Sequence[EditRequest],
    base: WildBase,
    tokens: int = 50,
    chat: bool = False,
    batch: int = 64,
    examples: int = 0,
) -> WildScores:
    """WILD scores of every edit of a chunk, all edits applied."""
    scores = WildScores()
    targets = [e.target for e in edits]
    full = _batched(replica, [e.prompt for e in edits], batch, max_new_tokens=tokens)
    for e, a in zip(edits, full, strict=True):
        j = wild.judge(a.text, e.target)
        scores.reliability.append(float(j.answer_first))
        scores.exact_reliability.append(float(j.exact))
        scores.echo.append(float(j.echo))
        scores.fluency.append(j.fluency)
        scores.fluency_unedited.append(base.fluency[e.prompt])
        scores.echo_unedited_own.append(float(base.echo_own[e.prompt]))
    paraphrased = [(e, p) for e in edits for p in e.paraphrases]
    para = _batched(replica, [p for _, p in paraphrased], batch, max_new_tokens=tokens, until_cut=True)
    for (e, _), a in zip(paraphrased, para, strict=True):
        answer = wild.cut(a.text, e.target)
        scores.generality.append(float(wild.answer_first(answer, e.target)))
        scores.exact_generality.append(float(wild.exact(answer, e.target)))
    # where the exact-prompt shortcut served some prompts, they are asked again with it off (searched);
    # otherwise (a router or weight method) the served answers were searched already
    shortcut = any(replica.method.exact_edits([e.prompt for e in edits]))
    if shortcut:
        with searched(replica):
            retrieved = _batched(replica, [e.prompt for e in edits], batch, max_new_tokens=tokens, until_cut=True)
        scores.reliability_retrieved = [
            float(wild.answer_first(wild.cut(a.text, t), t)) for a, t in zip(retrieved, targets, strict=True)
        ]
    else:
        scores.reliability_retrieved = list(scores.reliability)
    probes = locality_prompts(edits)
    loc = _batched(replica, probes, batch, max_new_tokens=tokens, until_cut=True)
    scores.locality = [float(wild.same_answer(a.text, base.cut_answers[p])) for p, a in zip(probes, loc, strict=True)]
    probes = subject_prompts(edits)
    subj = _batched(replica, probes, batch, max_new_tokens=tokens, until_cut=True)
    scores.subject_locality = [
        float(wild.same_answer(a.text, base.cut_answers[p])) for p, a in zip(probes, subj, strict=True)
    ]
    if chat:
        rel = _batched(replica, [e.prompt for e in edits], batch, max_new_tokens=tokens, chat=True, until_cut=True)
        scores.chat_reliability = _replies_contain(rel, targets)
        if shortcut:
            with searched(replica):
                rel = _batched(
                    replica, [e.prompt for e in edits], batch, max_new_tokens=tokens, chat=True, until_cut=True
                )
        scores.chat_reliability_retrieved = _replies_contain(rel, targets)
        gen = _batched(replica, [p for _, p in paraphrased], batch, max_new_tokens=tokens, chat=True, until_cut=True)
        scores.chat_generality = _replies_contain(gen, [e.target for e, _ in paraphrased])
    shown = [
        {"prompt": e.prompt, "target": e.target, "generated": a.text, "fired": str(a.fired)}
        for e, a in zip(edits, full, strict=True)
    ]
    scores.examples = shown[:examples]
    scores.misses = [row for row, ok in zip(shown, scores.reliability, strict=True) if not ok][:examples]
    return scores
