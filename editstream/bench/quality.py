"""The lifelong-editing quality benchmark (the protocol of ../shared/data/README.md).

Edits are shuffled with a seed, cut into chunks of T; each chunk's T edits are applied one after
another to a fresh (unedited) model, then all T are scored: reliability (prompt -> target),
generality (paraphrase -> target) as teacher-forced token accuracy, locality as agreement with
the unedited model's argmax on the locality prompt + answer. Retention by edit age comes from the
largest T: each edit's reliability against how many edits came after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from editstream.edits import EditRequest
from editstream.metrics import agreement, mean, token_accuracy
from editstream.replica import Replica

log = logging.getLogger(__name__)

AGE_BUCKETS = (0, 1, 10, 100, 1000, 10000)


@dataclass
class ChunkScores:
    reliability: list[float]
    generality: list[float]
    locality: list[float]
    fired_on_prompt: list[bool]
    fired_on_locality: list[bool]


def score_chunk(replica: Replica, edits: Sequence[EditRequest], base_locality: dict[str, list[int]]) -> ChunkScores:
    """Score every edit of a chunk after all of them were applied."""
    prompts = [e.prompt for e in edits]
    targets = [e.target for e in edits]
    preds, ids, fired = replica.predict(prompts, targets)
    rel = [token_accuracy(p, a) for p, a in zip(preds, ids, strict=True)]
    with_para = [(e.paraphrases[0], e.target) for e in edits if e.paraphrases]
    gen = []
    if with_para:
        p2, a2, _ = replica.predict([c for c, _ in with_para], [t for _, t in with_para])
        gen = [token_accuracy(p, a) for p, a in zip(p2, a2, strict=True)]
    with_loc = [e for e in edits if e.locality]
    loc, loc_fired = [], []
    if with_loc:
        probes = [e.locality[0] for e in with_loc]
        p3, _, f3 = replica.predict([p.prompt for p in probes], [p.answer for p in probes])
        loc = [agreement(p, base_locality[e.edit_id]) for p, e in zip(p3, with_loc, strict=True)]
        loc_fired = [f is not None for f in f3]
    return ChunkScores(rel, gen, loc, [f is not None for f in fired], loc_fired)


def unedited_locality(replica: Replica, edits: Sequence[EditRequest]) -> dict[str, list[int]]:
    """The unedited model's argmax on each edit's locality probe (computed once per run)."""
    with_loc = [e for e in edits if e.locality]
    preds, _, _ = replica.predict(
        [e.locality[0].prompt for e in with_loc], [e.locality[0].answer for e in with_loc], edited=False
    )
    return {e.edit_id: p for e, p in zip(with_loc, preds, strict=True)}


def age_bucket(age: int) -> str:
    for lo, hi in zip(AGE_BUCKETS, AGE_BUCKETS[1:], strict=False):
        if lo <= age < hi:
            return f"{lo}-{hi - 1}"
    return f">={AGE_BUCKETS[-1]}"


def run_quality(replica: Replica, edits: Sequence[EditRequest], chunk_sizes: Sequence[int]) -> dict[str, Any]:
    """Rows per T (means over all scored edits), retention by age for the largest T, edit throughput."""
    method = replica.method
    base_loc = unedited_locality(replica, edits)
    rows, retention = [], []
    compute_s, computed, artifact_bytes = 0.0, 0, 0
    largest = max((t for t in chunk_sizes if t <= len(edits)), default=None)
    for T in chunk_sizes:
        chunks = [edits[i : i + T] for i in range(0, len(edits) - T + 1, T)]
        if not chunks:
            log.warning("T=%d skipped: only %d edits", T, len(edits))
            continue
        agg = ChunkScores([], [], [], [], [])
        ages: dict[str, list[float]] = {}
        for chunk in tqdm(chunks, desc=f"{method.name} T={T}", leave=False):
            method.reset()
            replica.version = 0
            started = time.perf_counter()
            artifacts = method.compute(chunk)
            compute_s += time.perf_counter() - started
            computed += len(chunk)
            artifact_bytes += sum(a.nbytes for a in artifacts)
            for seq, artifact in enumerate(artifacts, start=1):
                replica.apply(seq, artifact)
            scores = score_chunk(replica, chunk, base_loc)
            for field in ("reliability", "generality", "locality", "fired_on_prompt", "fired_on_locality"):
                getattr(agg, field).extend(getattr(scores, field))
            if largest == T:
                for i, r in enumerate(scores.reliability):
                    ages.setdefault(age_bucket(T - 1 - i), []).append(r)
        rows.append(
            {
                "T": T,
                "n": len(agg.reliability),
                "chunks": len(chunks),
                "reliability": round(mean(agg.reliability), 4),
                "generality": round(mean(agg.generality), 4),
                "locality": round(mean(agg.locality), 4),
                "retrieval_fired_on_prompt": round(mean([float(x) for x in agg.fired_on_prompt]), 4),
                "retrieval_fired_on_locality": round(mean([float(x) for x in agg.fired_on_locality]), 4),
            }
        )
        log.info("%s T=%d: %s", method.name, T, rows[-1])
        if largest == T:
            retention = [{"age_edits": k, "n": len(v), "reliability": round(mean(v), 4)} for k, v in ages.items()]
    method.reset()
    replica.version = 0
    return {
        "rows": rows,
        "retention_by_age": retention,
        "edit_throughput_per_s": round(computed / compute_s, 3) if compute_s else None,
        "edit_seconds_mean": round(compute_s / computed, 3) if computed else None,
        "artifact_bytes_mean": round(artifact_bytes / computed, 1) if computed else None,
    }
