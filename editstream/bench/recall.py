"""Own-edit recall of the approximate (IVF) key index against the exact (flat) one, on benchmark data.

The keys are RECIPE's own (the shipped retriever on the sentence encoder); the queries are each
edit's prompt and paraphrases, searched (the exact-prompt lookup is never consulted), and judged by
the served retrieval: the index's best key, the sentinel's threshold and the relation gate. The same
keys go, in one shuffled stream order, into a flat index and into the index a replica uses with
`ann_threshold` (flat until the threshold, then IVF, retrained as it grows), with facts from the
train splits as distractors; a share of the distractors is then removed (supersedes and retracts)
and everything is asked again. Reported per edit set and query kind: how often each index returns
the query's own edit, their ratio (the issue's target: >= 0.99), how often the two return the same
edit (or both none), and the search time per query of each index. Before that, a sweep over
`nprobe` on the best key alone (cheap: the query vectors are encoded once): where the IVF index's
best key is flat's, the served answer is the same, so that agreement bounds the served recall.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from editstream.edits import EditRequest
from editstream.methods.recipe.method import RecipeRetrieval
from editstream.retrieval import DEFAULT_NPROBE, KeyIndex, ScalingKeyIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """One searched prompt and the edit it should find."""

    text: str
    owner: str
    group: str  # "<edit set>/<prompt|paraphrase>"


def stored_edits(
    edit_sets: dict[str, Sequence[EditRequest]], distractors: Sequence[EditRequest]
) -> dict[str, EditRequest]:
    """Every stored edit under an id that names its set and row (benchmark ids can repeat across sets)."""
    stored = {f"{name}/{i}": e for name, edits in edit_sets.items() for i, e in enumerate(edits)}
    stored.update({f"distractor/{i}": e for i, e in enumerate(distractors)})
    return stored


def queries_of(edit_sets: dict[str, Sequence[EditRequest]]) -> list[Query]:
    """Each edit's prompt and paraphrases, with the id of the edit they should find."""
    out = []
    for name, edits in edit_sets.items():
        for i, e in enumerate(edits):
            out.append(Query(e.prompt, f"{name}/{i}", f"{name}/prompt"))
            out.extend(Query(p, f"{name}/{i}", f"{name}/paraphrase") for p in e.paraphrases)
    return out


def encode(retrieval: RecipeRetrieval, texts: Sequence[str], queries: bool, batch: int = 256) -> torch.Tensor:
    """RECIPE keys (as an editor computes them) or query vectors (as a replica searches) of `texts`."""
    parts = []
    for start in tqdm(range(0, len(texts), batch), desc="queries" if queries else "keys", unit="batch"):
        r = retrieval.encode(texts[start : start + batch])
        with torch.inference_mode():
            parts.append(retrieval.net.retriever.queries(r) if queries else retrieval.keys(r))
    return torch.cat(parts)


def search_ms(index: KeyIndex | ScalingKeyIndex, q: torch.Tensor) -> float:
    """Milliseconds per query of the index search alone, one query at a time (as a replica asks)."""
    started = time.perf_counter()
    for row in q:
        index.search(row.unsqueeze(0))
    return 1000 * (time.perf_counter() - started) / max(1, len(q))


def sweep(
    flat: KeyIndex, ann: ScalingKeyIndex, q: torch.Tensor, queries: Sequence[Query], nprobes: Sequence[int]
) -> list[dict]:
    """Per `nprobe`: how often the IVF index's best key is flat's (where they agree, the served answer
    is the same whatever the sentinel and gate decide), overall and per group, and its search time."""
    _, want = flat.search(q)
    timed = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(0))[:500]]
    out = []
    for nprobe in nprobes:
        ann.set_nprobe(nprobe)
        _, got = ann.search(q)
        groups: dict[str, list[bool]] = {}
        for query, w, g in zip(queries, want, got, strict=True):
            groups.setdefault(query.group, []).append(w == g)
            groups.setdefault("all", []).append(w == g)
        out.append(
            {
                "nprobe": ann.nprobe,
                "top1_agreement": {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())},
                "search_ms_per_query": round(search_ms(ann, timed), 4),
            }
        )
    return out


def _retrieve(retrieval: RecipeRetrieval, index, queries: Sequence[Query], about, batch: int) -> list[str | None]:
    retrieval.index = index
    found: list[str | None] = []
    for start in tqdm(range(0, len(queries), batch), desc="queries", unit="batch"):
        found.extend(retrieval.retrieve([q.text for q in queries[start : start + batch]], about=about))
    return found


def compare(
    retrieval: RecipeRetrieval, flat: KeyIndex, ann: ScalingKeyIndex, queries: Sequence[Query], about, batch: int
) -> dict[str, dict[str, float | int]]:
    """Per query group (and `all`): own-edit rate of each index, their ratio, agreement."""
    by_flat = _retrieve(retrieval, flat, queries, about, batch)
    by_ann = _retrieve(retrieval, ann, queries, about, batch)
    groups: dict[str, list[tuple[bool, bool, bool]]] = {}
    for q, f, a in zip(queries, by_flat, by_ann, strict=True):
        row = (f == q.owner, a == q.owner, f == a)
        groups.setdefault(q.group, []).append(row)
        groups.setdefault("all", []).append(row)
    out = {}
    for name, rows in sorted(groups.items()):
        n = len(rows)
        own_flat = sum(r[0] for r in rows) / n
        own_ann = sum(r[1] for r in rows) / n
        out[name] = {
            "queries": n,
            "own_edit_flat": round(own_flat, 4),
            "own_edit_ann": round(own_ann, 4),
            "recall_vs_flat": round(own_ann / own_flat, 4) if own_flat else None,
            "agreement": round(sum(r[2] for r in rows) / n, 4),
        }
    return out


def run_recall(
    retrieval: RecipeRetrieval,
    edit_sets: dict[str, Sequence[EditRequest]],
    distractors: Sequence[EditRequest],
    threshold: int,
    nprobe: int = DEFAULT_NPROBE,
    remove_share: float = 0.2,
    seed: int = 0,
    batch: int = 128,
    sweep_nprobes: Sequence[int] = (),
) -> dict:
    """Fill a flat and a scaling (flat -> IVF) index with the same keys in one stream order; sweep
    `sweep_nprobes` on the best key alone; compare what the served retrieval finds through each
    index at `nprobe`, remove `remove_share` of the distractors, compare again."""
    stored = stored_edits(edit_sets, distractors)
    order = list(stored)
    random.Random(seed).shuffle(order)
    keys = encode(retrieval, [stored[i].prompt for i in order], queries=False)
    dim = keys.shape[1]
    flat, ann = KeyIndex(dim), ScalingKeyIndex(dim, threshold, nprobe, background=False)  # trained in the fill
    fill_s = {"flat": 0.0, "ann": 0.0}
    for name, index in (("flat", flat), ("ann", ann)):
        started = time.perf_counter()
        for edit_id, key in zip(order, keys, strict=True):
            index.add(edit_id, key)
        fill_s[name] = round(time.perf_counter() - started, 3)
    about = {i: {"prompt": e.prompt, "subject": e.subject or ""} for i, e in stored.items()}.__getitem__
    queries = queries_of(edit_sets)
    q = encode(retrieval, [x.text for x in queries], queries=True)
    timed = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(seed))[:500]]
    result = {
        "stored": len(stored),
        "edit_sets": {name: len(edits) for name, edits in edit_sets.items()},
        "distractors": len(distractors),
        "threshold": threshold,
        "ivf_lists": getattr(ann.inner, "nlist", None),
        "ivf_trained_on": getattr(ann.inner, "trained_on", None),
        "fill_seconds": fill_s,
        "flat_search_ms_per_query": round(search_ms(flat, timed), 4),
        "sweep": sweep(flat, ann, q, queries, sweep_nprobes),
    }
    ann.set_nprobe(nprobe)
    result["nprobe"] = ann.nprobe
    result["ann_search_ms_per_query"] = round(search_ms(ann, timed), 4)
    result["full"] = compare(retrieval, flat, ann, queries, about, batch)
    gone = [i for i in order if i.startswith("distractor/")]
    gone = random.Random(seed + 1).sample(gone, int(remove_share * len(gone)))
    for edit_id in gone:
        flat.remove(edit_id)
        ann.remove(edit_id)
    result["removed"] = len(gone)
    result["after_removals"] = compare(retrieval, flat, ann, queries, about, batch)
    return result
