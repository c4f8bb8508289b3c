"""The forgetting study, live: one CounterFact stream through several methods at once.

Every method gets its own system (namespace, 1 replica, 1 editor, 1 evaluator) and the same facts
in the same order. The evaluators log retention of earlier edits (WILD: their prompts and a
paraphrase each), locality and perplexity on accurate Wikipedia passages (general ability) as the
edits pile up. The facts go in chunks: after each chunk the feeder waits until the replica applied
it and the evaluator finished `rounds` probe rounds on that state, because an evaluator gives way
to a stream that does not pause (a burst of 1,000 facts would otherwise be measured only at its
end). `analyse` reads a run's Arrow
log and finds, in bins of edits applied, where old-edit retention starts to fall (gradual phase),
where general ability collapses (perplexity above `collapse_rise` times its start, or locality
below `collapse_locality`: catastrophic phase), and at which edit count the monitor's alarm first
fires. `plot` draws the methods side by side.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from editstream.arrowlog import read_log
from editstream.edits import EditRequest
from editstream.monitoring import AlarmThresholds, alarms
from services.wiring.demo import feed
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)


def run_study(
    redis_url: str,
    out_dir: Path,
    methods: list[str],
    facts: list[EditRequest],
    budget: float,
    timeout_s: float,
    weight_options: dict[str, Any] | None = None,
    chunk: int = 10,
    rounds: int = 1,
) -> dict[str, Any]:
    """Stream `facts` into one system per method, `chunk` at a time with `rounds` evaluator rounds
    after each; returns per-method {applied, seconds}. `weight_options` go to the weight-editing
    methods (rome, memit); editors get one thread each, so the methods' editors share the cores
    instead of oversubscribing them."""
    systems = {}
    for m in methods:
        config = SystemConfig(
            redis_url=redis_url,
            run_dir=str(out_dir / m),
            method=m,
            namespace=f"study-{m}",
            replicas=1,
            editors=1,
            evaluators=1,
            eval_budget=budget,
            editor_threads=1,
            method_options=dict(weight_options or {}) if m in ("rome", "memit") else {},
        )
        systems[m] = System(config).start()
    started = time.time()
    deadline = started + timeout_s
    done: dict[str, Any] = {}
    drivers = [
        threading.Thread(target=_drive, args=(m, s, facts, chunk, rounds, started, deadline, done), daemon=True)
        for m, s in systems.items()
    ]
    for t in drivers:
        t.start()
    for t in drivers:
        t.join(max(0.0, deadline - time.time()) + 180)  # a driver gives up at the deadline, then stops
    for m, s in systems.items():  # a driver that did not finish leaves its system running
        if m not in done:
            done[m] = {"applied": s.replica_states()[0]["version"], "seconds": None, "timed_out": True}
            s.stop()
    return done


def _drive(
    method: str,
    system: System,
    facts: list[EditRequest],
    chunk: int,
    rounds: int,
    started: float,
    deadline: float,
    done: dict[str, Any],
) -> None:
    """Feed `facts` `chunk` at a time; after each, wait until the replica applied it and the
    evaluator ran `rounds` rounds on that state. Then stop the system (a finished method takes no
    more of the cores the others still use) and record {applied, seconds} in `done`."""
    for lo in range(0, len(facts), chunk):
        feed(system.store, facts[lo : lo + chunk], 0.0, progress=False)
        fed = min(len(facts), lo + chunk)
        while system.replica_states()[0]["version"] < fed:
            if time.time() > deadline:
                log.warning("%s: deadline passed with %d of %d facts fed", method, fed, len(facts))
                return
            time.sleep(0.5)
        seen = system.stats("evaluator-0")["rounds"]
        if not system.wait_for_evaluation(rounds=seen + rounds, min_version=fed, timeout_s=deadline - time.time()):
            log.warning("%s: no evaluator round at %d edits before the deadline", method, fed)
            return
        if (fed // chunk) % 10 == 0:
            log.info(
                "%s: %d of %d edits applied and probed after %.0f s", method, fed, len(facts), time.time() - started
            )
    done[method] = {"applied": system.replica_states()[0]["version"], "seconds": round(time.time() - started, 1)}
    log.info("%s: all %d edits applied after %.0f s", method, len(facts), time.time() - started)
    system.stop()


def _bins(rows: list[dict], n: int, width: int) -> list[dict]:
    """Mean score per range of `width` edits applied, placed at the mean edit count of its probes."""
    out = []
    for lo in range(0, n + 1, width):
        inside = [r for r in rows if lo <= r["version"] < lo + width]
        if inside:
            mean = sum(r["score"] for r in inside) / len(inside)
            at = sum(r["version"] for r in inside) / len(inside)
            out.append(
                {"edits": round(at, 1), "range": [lo, lo + width - 1], "n": len(inside), "value": round(mean, 4)}
            )
    return out


def analyse(
    evals: pa.Table,
    n: int,
    width: int = 50,
    min_age: int = 10,
    gradual_below: float = 0.8,
    collapse_rise: float = 3.0,
    collapse_locality: float = 0.5,
) -> dict[str, Any]:
    """Curves by edits applied and the edit counts where each phase starts (None: it did not)."""
    rows = evals.select(["kind", "version", "age_edits", "score"]).to_pylist()
    old = [r for r in rows if r["kind"] == "reliability" and r["age_edits"] >= min_age]
    curves = {
        "retention_old": _bins(old, n, width),
        "reliability_all": _bins([r for r in rows if r["kind"] == "reliability"], n, width),
        "generality": _bins([r for r in rows if r["kind"] == "generality"], n, width),
        "locality": _bins([r for r in rows if r["kind"] == "locality"], n, width),
        "perplexity": _bins([r for r in rows if r["kind"] == "perplexity"], n, width),
    }
    ppl = curves["perplexity"]
    base_ppl = ppl[0]["value"] if ppl else None
    # each phase: the first bin (by its first edit count) where the measure crosses its threshold
    gradual = next((b["range"][0] for b in curves["retention_old"] if b["value"] < gradual_below), None)
    by_ppl = next((b["range"][0] for b in ppl if base_ppl and b["value"] > collapse_rise * base_ppl), None)
    by_loc = next((b["range"][0] for b in curves["locality"] if b["value"] < collapse_locality), None)
    collapse = min((x for x in (by_ppl, by_loc) if x is not None), default=None)
    alarm_at, alarm_text, first_by_kind = None, [], {}
    for edge in range(width, n + 2 * width, width):  # the monitor's alarms as they stood at each edit count
        fired = alarms(evals.filter(pc.less(evals["version"], edge)), AlarmThresholds())
        if fired and alarm_at is None:
            alarm_at, alarm_text = edge, fired
        for text in fired:
            first_by_kind.setdefault(text.split()[0], {"by_edits": edge, "alarm": text})
    return {
        "curves": curves,
        "perplexity_start": base_ppl,
        "gradual_phase_from_edits": gradual,
        "collapse_from_edits": collapse,
        "alarm_first_fired_by_edits": alarm_at,
        "alarm": alarm_text,
        "alarms_first_fired": first_by_kind,
        "thresholds": {
            "gradual": f"retention of edits >= {min_age} old below {gradual_below}",
            "collapse": f"perplexity above {collapse_rise}x its start or locality below {collapse_locality}",
        },
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("retention_old", "retention of edits >= 10 edits old"),
        ("locality", "locality (agreement with the unedited model)"),
        ("perplexity", "perplexity on accurate Wikipedia passages"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method, res in results.items():
            pts = res["curves"][key]
            ax.plot([p["edits"] for p in pts], [p["value"] for p in pts], marker=".", label=method)
        ax.set_xlabel("edits applied")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_eval(run_dir: Path) -> pa.Table:
    return read_log(run_dir, "eval")


def applied_span(run_dir: Path) -> dict[str, Any]:
    """From the run's edits log: edits applied and seconds from the first fact's ingest to the last apply."""
    edits = read_log(run_dir, "edits")
    if not edits.num_rows:
        return {"applied": 0, "seconds": None}
    seconds = (pc.max(edits["applied_ms"]).as_py() - pc.min(edits["ingest_ms"]).as_py()) / 1000
    return {"applied": pc.max(edits["seq"]).as_py(), "seconds": round(seconds, 1)}
