"""`editstream monitor`: a live terminal dashboard over Redis state and the run's Arrow logs."""

from __future__ import annotations

import time
from pathlib import Path

from editstream.arrowlog import read_log
from editstream.monitoring import AlarmThresholds, alarms, by_version, recent, retention_by_age, throughput
from services.transport.store import RedisStore, status


def render(store: RedisStore | None, run_dir: Path, thresholds: AlarmThresholds) -> str:
    lines = []
    if store is not None:
        s = status(store)
        lines.append(
            f"journal {s['journal']}   ingest lag {s['ingest_lag']}   DLQ {s['dlq']}   "
            f"edits/s (10 s) {s['edits_per_s_10s']}"
        )
        for name, r in sorted(s["replicas"].items()):
            lines.append(
                f"  {name:<12} version {r['version']:>7}  digest {r['digest']} "
                f"(of v{r.get('digest_version', r['version'])})  "
                f"(seen {time.time() - r['time']:.0f} s ago)"
            )
    evals, edits = read_log(run_dir, "eval"), read_log(run_dir, "edits")
    tp = throughput(edits)
    if tp:
        lat = sorted(r["latency_ms"] for r in tp)
        lines.append(f"edit latency (per-second means) median {lat[len(lat) // 2]:.0f} ms, max {lat[-1]:.0f} ms")
    lines.append(f"evaluation records: {evals.num_rows}")
    ret = retention_by_age(evals)
    if ret:
        lines.append("retention by edit age:  " + "  ".join(f"{r['age']}: {r['score']:.2f} (n={r['n']})" for r in ret))
    loc = by_version(evals, "locality", bins=5)
    if loc:
        lines.append("locality vs edits:      " + "  ".join(f"~{r['edits']:.0f}: {r['score']:.2f}" for r in loc))
    for kind in ("reliability", "generality", "locality"):
        value = recent(evals, kind)
        if value is not None:
            lines.append(f"recent {kind:<12} {value:.3f}")
    found = alarms(evals, thresholds)
    lines.append("ALARM: " + " | ".join(found) if found else "alarms: none")
    return "\n".join(lines)


def monitor(store: RedisStore | None, run_dir: Path, interval_s: float, once: bool, thresholds: AlarmThresholds) -> int:
    while True:
        text = render(store, run_dir, thresholds)
        if once:
            print(text)
            return 1 if "ALARM" in text else 0
        print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + f"  editstream monitor  {run_dir}\n" + text, flush=True)
        time.sleep(interval_s)
