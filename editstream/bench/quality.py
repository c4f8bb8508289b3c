"""The lifelong-editing quality benchmark (the protocol of ../shared/data/README.md).

Scored two ways side by side: WILD (greedy generation as a user reads it; `wild_scores`, the
primary columns) and teacher-forced (the literature's form, below).

Edits are shuffled with a seed, cut into chunks of T; each chunk's T edits are applied one after
another to a fresh (unedited) model, then all T are scored: reliability (prompt -> target),
generality (paraphrase -> target) as teacher-forced token accuracy, locality as agreement with
the unedited model's argmax on the locality prompt + answer. Subject locality is the same agreement
on held-out prompts about the edited subject that ask about something else (probes.SUBJECT_PROBES,
teacher-forced on the edit's target): it falls when an edit answers its target to every sentence
about the subject. For methods that report which edit served a row, retrieval_own_* is how often it
was the edit being asked about. Retention by edit age comes from the largest T: each edit's
reliability against how many edits came after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tqdm import tqdm

from editstream.artifacts import Artifact
from editstream.bench.wild_scores import WildBase, WildScores, is_question_set, score_wild_chunk, unedited_wild
from editstream.edits import EditRequest
from editstream.methods.base import EditMethod
from editstream.metrics import agreement, mean, token_accuracy
from editstream.probes import SUBJECT_PROBES
from editstream.replica import Replica

log = logging.getLogger(__name__)

AGE_BUCKETS = (0, 1, 10, 100, 1000, 10000)


@dataclass
class ChunkScores:
    reliability: list[float] = field(default_factory=list)
    generality: list[float] = field(default_factory=list)
    locality: list[float] = field(default_factory=list)
    subject_locality: list[float] = field(default_factory=list)
    fired_on_prompt: list[bool] = field(default_factory=list)
    fired_on_locality: list[bool] = field(default_factory=list)
    own_on_prompt: list[bool] = field(default_factory=list)
    own_on_paraphrase: list[bool] = field(default_factory=list)


Probe = tuple[str, str, str]  # (edit id, context, answer)


def locality_probes(edits: Sequence[EditRequest]) -> list[Probe]:
    """Each edit's first locality probe (unrelated prompt + answer)."""
    return [(e.edit_id, e.locality[0].prompt, e.locality[0].answer) for e in edits if e.locality]


def subject_probes(edits: Sequence[EditRequest]) -> list[Probe]:
    """Held-out prompts about each edit's subject, teacher-forced on its target."""
    return [(e.edit_id, t.format(e.subject), e.target) for e in edits if e.subject for t in SUBJECT_PROBES]


def _predict(replica: Replica, probes: Sequence[Probe], edited: bool = True) -> tuple[list[list[int]], list]:
    if not probes:
        return [], []
    preds, _, fired = replica.predict([c for _, c, _ in probes], [a for _, _, a in probes], edited=edited)
    return preds, fired


def unedited_predictions(replica: Replica, edits: Sequence[EditRequest]) -> dict[tuple[str, str], list[int]]:
    """The unedited model's argmax on every locality and subject probe, keyed by (edit id, context);
    computed once per run."""
    probes = locality_probes(edits) + subject_probes(edits)
    preds, _ = _predict(replica, probes, edited=False)
    return {(i, c): p for (i, c, _), p in zip(probes, preds, strict=True)}


def _agreement(replica: Replica, probes: Sequence[Probe], base: dict[tuple[str, str], list[int]]):
    preds, fired = _predict(replica, probes)
    return [agreement(p, base[(i, c)]) for (i, c, _), p in zip(probes, preds, strict=True)], fired


def score_chunk(replica: Replica, edits: Sequence[EditRequest], base: dict[tuple[str, str], list[int]]) -> ChunkScores:
    """Score every edit of a chunk after all of them were applied."""
    preds, ids, fired = replica.predict([e.prompt for e in edits], [e.target for e in edits])
    rel = [token_accuracy(p, a) for p, a in zip(preds, ids, strict=True)]
    with_para = [e for e in edits if e.paraphrases]
    gen, para_fired = [], []
    if with_para:
        p2, a2, para_fired = replica.predict([e.paraphrases[0] for e in with_para], [e.target for e in with_para])
        gen = [token_accuracy(p, a) for p, a in zip(p2, a2, strict=True)]
    loc, loc_fired = _agreement(replica, locality_probes(edits), base)
    subject_loc, _ = _agreement(replica, subject_probes(edits), base)
    return ChunkScores(
        reliability=rel,
        generality=gen,
        locality=loc,
        subject_locality=subject_loc,
        fired_on_prompt=[f is not None for f in fired],
        fired_on_locality=[f is not None for f in loc_fired],
        own_on_prompt=[f == e.edit_id for f, e in zip(fired, edits, strict=True)],
        own_on_paraphrase=[f == e.edit_id for f, e in zip(para_fired, with_para, strict=True)],
    )


def _compute(method: EditMethod, chunk: Sequence[EditRequest], piece: int = 32) -> list[Artifact]:
    """Artifacts of a chunk, with a progress bar over pieces of it when the method computes each edit
    on its own (sequential and batch-solving methods get the whole chunk at once)."""
    if method.sequential or len(chunk) <= piece:
        return method.compute(chunk)
    out = []
    for i in tqdm(range(0, len(chunk), piece), desc=f"{method.name} compute", unit="piece", leave=False):
        out += method.compute(chunk[i : i + piece])
    return out


def _rate(flags: Sequence[bool]) -> float:
    return round(mean([float(x) for x in flags]), 4)


def age_bucket(age: int) -> str:
    for lo, hi in zip(AGE_BUCKETS, AGE_BUCKETS[1:], strict=False):
        if lo <= age < hi:
            return f"{lo}-{hi - 1}"
    return f">={AGE_BUCKETS[-1]}"


def _wild_fields(w: WildScores) -> dict[str, Any]:
    """The WILD columns of a result row (answer-first unless named exact)."""
    fluency, unedited = mean(w.fluency), mean(w.fluency_unedited)
    row = {
        "wild_reliability": round(mean(w.reliability), 4),
        "wild_generality": round(mean(w.generality), 4),
        "wild_exact_reliability": round(mean(w.exact_reliability), 4),
        "wild_exact_generality": round(mean(w.exact_generality), 4),
        "reliability_retrieved": round(mean(w.reliability_retrieved), 4),
        "wild_locality": round(mean(w.locality), 4),
        "subject_locality": round(mean(w.subject_locality), 4),
        "echo": round(mean(w.echo), 4),
        "echo_unedited_own": round(mean(w.echo_unedited_own), 4),
        "fluency": round(fluency / unedited, 4) if unedited else None,
        "fluency_entropy": round(fluency, 4),
        "fluency_entropy_unedited": round(unedited, 4),
    }
    if w.chat_reliability:
        row["chat_reliability"] = round(mean(w.chat_reliability), 4)
        row["chat_generality"] = round(mean(w.chat_generality), 4)
        row["chat_reliability_retrieved"] = round(mean(w.chat_reliability_retrieved), 4)
    return row


def run_quality(
    replica: Replica,
    edits: Sequence[EditRequest],
    chunk_sizes: Sequence[int],
    wild_tokens: int = 50,
    chat: bool | None = None,
    examples: int = 8,
    wild_base: WildBase | None = None,
) -> dict[str, Any]:
    """Rows per T (means over all scored edits), retention by age for the largest T, edit throughput.

    wild_tokens: new tokens of the WILD generations (0 skips the WILD half); chat: score the chat
    form too (default: when the prompts are questions); examples: generations kept per T in the JSON;
    wild_base: the unedited model's generations on these edits' probes, if already made (they do not
    depend on the method, so one run can share them among methods).
    """
    method = replica.method
    base = unedited_predictions(replica, edits)
    chat = is_question_set(edits) if chat is None else chat
    if wild_tokens and wild_base is None:
        wild_base = unedited_wild(replica, edits, wild_tokens)
    wild_base = wild_base if wild_tokens else None
    rows, retention = [], []
    compute_s, computed, artifact_bytes = 0.0, 0, 0
    largest = max((t for t in chunk_sizes if t <= len(edits)), default=None)
    for T in chunk_sizes:
        chunks = [edits[i : i + T] for i in range(0, len(edits) - T + 1, T)]
        if not chunks:
            log.warning("T=%d skipped: only %d edits", T, len(edits))
            continue
        agg, wild_agg = ChunkScores(), WildScores()
        ages: dict[str, list[float]] = {}
        wild_ages: dict[str, list[float]] = {}
        for chunk in tqdm(chunks, desc=f"{method.name} T={T}", leave=False):
            method.reset()
            replica.version = 0
            started = time.perf_counter()
            artifacts = _compute(method, chunk)
            compute_s += time.perf_counter() - started
            computed += len(chunk)
            artifact_bytes += sum(a.nbytes for a in artifacts)
            for seq, artifact in enumerate(artifacts, start=1):
                replica.apply(seq, artifact)
            scores = score_chunk(replica, chunk, base)
            for f in fields(ChunkScores):
                getattr(agg, f.name).extend(getattr(scores, f.name))
            if wild_base is not None:
                w = score_wild_chunk(replica, chunk, wild_base, wild_tokens, chat, examples=examples)
                wild_agg.extend(w)
                wild_agg.examples, wild_agg.misses = wild_agg.examples[:examples], wild_agg.misses[:examples]
            if largest == T:
                for i, r in enumerate(scores.reliability):
                    ages.setdefault(age_bucket(T - 1 - i), []).append(r)
                    if wild_base is not None:
                        wild_ages.setdefault(age_bucket(T - 1 - i), []).append(w.reliability[i])
        rows.append(
            {
                "T": T,
                "n": len(agg.reliability),
                "chunks": len(chunks),
                "reliability": round(mean(agg.reliability), 4),
                "generality": round(mean(agg.generality), 4),
                "locality": round(mean(agg.locality), 4),
                "subject_locality_tf": round(mean(agg.subject_locality), 4),
                "retrieval_fired_on_prompt": _rate(agg.fired_on_prompt),
                "retrieval_fired_on_locality": _rate(agg.fired_on_locality),
                "retrieval_own_on_prompt": _rate(agg.own_on_prompt),
                "retrieval_own_on_paraphrase": _rate(agg.own_on_paraphrase),
                **(_wild_fields(wild_agg) if wild_base is not None else {}),
                "examples": wild_agg.examples,
                "misses": wild_agg.misses,
            }
        )
        log.info("%s T=%d: %s", method.name, T, rows[-1])
        if largest == T:
            retention = [
                {
                    "age_edits": k,
                    "n": len(v),
                    "reliability": round(mean(v), 4),
                    **({"wild_reliability": round(mean(wild_ages[k]), 4)} if wild_ages else {}),
                }
                for k, v in ages.items()
            ]
    method.reset()
    replica.version = 0
    return {
        "rows": rows,
        "retention_by_age": retention,
        "edit_throughput_per_s": round(computed / compute_s, 3) if compute_s else None,
        "edit_seconds_mean": round(compute_s / computed, 3) if computed else None,
        "artifact_bytes_mean": round(artifact_bytes / computed, 1) if computed else None,
    }
