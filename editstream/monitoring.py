"""Summaries of a run's Arrow logs: retention by edit age, locality vs edits, throughput, alarms.

Pure functions over pyarrow tables, shared by the live monitor and the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

AGE_EDGES = (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 10**9)


def age_label(lo: int, hi: int) -> str:
    return f"{lo}" if hi == lo + 1 else (f">={lo}" if hi >= 10**9 else f"{lo}-{hi - 1}")


def retention_by_age(evals: pa.Table, kind: str = "reliability") -> list[dict[str, Any]]:
    """Mean score of `kind` probes per edit-age bucket (age in edits applied after the probed edit)."""
    rows = [r for r in evals.select(["kind", "age_edits", "score"]).to_pylist() if r["kind"] == kind]
    out = []
    for lo, hi in zip(AGE_EDGES, AGE_EDGES[1:], strict=False):
        scores = [r["score"] for r in rows if lo <= r["age_edits"] < hi]
        if scores:
            out.append({"age": age_label(lo, hi), "lo": lo, "n": len(scores), "score": sum(scores) / len(scores)})
    return out


def by_version(evals: pa.Table, kind: str, bins: int = 10) -> list[dict[str, Any]]:
    """Mean score of `kind` probes in `bins` equal ranges of the replica version (number of edits)."""
    rows = [r for r in evals.select(["kind", "version", "score"]).to_pylist() if r["kind"] == kind]
    if not rows:
        return []
    top = max(r["version"] for r in rows) + 1
    width = max(1, math.ceil(top / bins))
    out = []
    for b in range(bins):
        scores = [r["score"] for r in rows if b * width <= r["version"] < (b + 1) * width]
        if scores:
            out.append({"edits": (b + 0.5) * width, "n": len(scores), "score": sum(scores) / len(scores)})
    return out


def recent(evals: pa.Table, kind: str, last: int = 200) -> float | None:
    """Mean score of the newest `last` probes of `kind`."""
    rows = [r["score"] for r in evals.select(["kind", "score"]).to_pylist() if r["kind"] == kind][-last:]
    return sum(rows) / len(rows) if rows else None


@dataclass(frozen=True)
class AlarmThresholds:
    retention: float = 0.7  # reliability of edits at least `min_age` edits old
    locality: float = 0.9
    min_age: int = 10
    min_probes: int = 20
    perplexity_rise: float = 2.0  # general ability: recent perplexity above this times the first measured


def alarms(evals: pa.Table, thresholds: AlarmThresholds = AlarmThresholds()) -> list[str]:
    """Human-readable alarms: old edits forgotten, or unrelated answers changed."""
    out = []
    old = [
        r["score"]
        for r in evals.select(["kind", "age_edits", "score"]).to_pylist()
        if r["kind"] == "reliability" and r["age_edits"] >= thresholds.min_age
    ]
    if len(old) >= thresholds.min_probes:
        value = sum(old[-200:]) / len(old[-200:])
        if value < thresholds.retention:
            out.append(f"RETENTION {value:.2f} < {thresholds.retention} for edits >= {thresholds.min_age} edits old")
    loc = [r["score"] for r in evals.select(["kind", "score"]).to_pylist() if r["kind"] == "locality"]
    if len(loc) >= thresholds.min_probes:
        value = sum(loc[-200:]) / len(loc[-200:])
        if value < thresholds.locality:
            out.append(f"LOCALITY {value:.2f} < {thresholds.locality}")
    ppl = [
        r["score"]
        for r in evals.select(["kind", "version", "score"]).sort_by("version").to_pylist()
        if r["kind"] == "perplexity"
    ]
    if len(ppl) >= 2:
        value = sum(ppl[-3:]) / len(ppl[-3:])
        if value > thresholds.perplexity_rise * ppl[0]:
            out.append(f"PERPLEXITY {value:.1f} > {thresholds.perplexity_rise} x {ppl[0]:.1f} (general ability lost)")
    return out


def throughput(edits: pa.Table, bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Edits applied (on the first replica) per time bucket, with the mean edit latency in it."""
    rows = edits.select(["replica", "applied_ms", "latency_ms"]).to_pylist()
    if not rows:
        return []
    first = sorted({r["replica"] for r in rows})[0]
    rows = [r for r in rows if r["replica"] == first]
    t0 = min(r["applied_ms"] for r in rows)
    buckets: dict[int, list[float]] = {}
    for r in rows:
        buckets.setdefault(int((r["applied_ms"] - t0) / (bucket_s * 1000)), []).append(r["latency_ms"])
    return [
        {"t_s": k * bucket_s, "edits_per_s": len(v) / bucket_s, "latency_ms": sum(v) / len(v)}
        for k, v in sorted(buckets.items())
    ]


def run_info(run_dir: Path) -> dict[str, Any]:
    """The run's description (method, model, ...) from run.json or summary.json, if present."""
    for name in ("run.json", "summary.json"):
        path = Path(run_dir) / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}
