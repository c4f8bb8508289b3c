"""`editstream demo`: the whole flow on the embedded defaults, on one machine.

Starts a private redis-server if none is reachable, runs the pipeline on local Ray with 2
replicas and an evaluator, feeds the demo facts, waits until every replica applied them, then
reports what changed (answers before and after), throughput, edit latency, and the run directory
holding the Arrow logs.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from editstream import wild
from editstream.arrowlog import read_log
from editstream.demo_facts import demo_facts
from editstream.edits import EditRequest
from editstream.events import event_fields
from services.transport.redis_server import RedisServer, reachable
from services.transport.store import RedisStore, connect
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class DemoOptions:
    facts: int = 200
    replicas: int = 2
    rate: float = 50.0
    run_dir: str | None = None
    method: str = "recipe"
    model: str = "smollm2-135m"
    redis_url: str | None = None
    showcase: int = 4
    checkpoint: str | None = None
    timeout_s: float = 600.0


def feed(store: RedisStore, edits: list[EditRequest], rate: float, progress: bool = True) -> float:
    """XADD each edit's fact event at `rate` per second (0: as fast as possible); returns seconds taken."""
    started = time.time()
    for i, edit in enumerate(tqdm(edits, desc="feeding facts", unit="fact", disable=not progress)):
        if rate > 0:
            delay = started + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        store.r.xadd(store.keys.facts, event_fields(edit))
    return time.time() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def edit_log(system: System, store: RedisStore, run_dir: Path, timeout_s: float = 30.0) -> list[float]:
    """Per-edit latency (XADD -> applied on all replicas), ms, from the replicas' edits log."""
    last, replicas = store.last_seq(), set(system.replica_names())
    deadline = time.time() + timeout_s
    while True:  # replicas append after applying: wait until every replica logged every entry
        rows = read_log(run_dir, "edits").select(["seq", "replica", "ingest_ms", "applied_ms"]).to_pylist()
        applied: dict[int, list[float]] = {}
        for r in rows:
            if r["replica"] in replicas:
                applied.setdefault(r["seq"], []).append(r["applied_ms"] - r["ingest_ms"])
        complete = [max(v) for seq, v in sorted(applied.items()) if len(v) == len(replicas)]
        if len(complete) >= last or time.time() > deadline:
            return complete
        time.sleep(0.2)


def method_options(method: str, checkpoint: str | None, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """A method's options: the checkpoint for methods that load a trained one, then those `given`
    (`--option KEY=VALUE`), which win."""
    return {**({"checkpoint": checkpoint} if checkpoint and method in ("recipe", "text-rag") else {}), **(given or {})}


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    run_dir = Path(opts.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        url = opts.redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        if not reachable(url):
            log.info("no Redis at %s: starting a private redis-server", url)
            url = stack.enter_context(RedisServer(directory=run_dir / "redis")).url
        namespace = f"editstream-demo-{uuid.uuid4().hex[:8]}"
        store = RedisStore(connect(url), namespace)
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            stack.callback(ray.shutdown)
        facts = demo_facts(opts.facts)
        print(f"starting {opts.replicas} replicas, 1 editor, 1 evaluator ({opts.method} on {opts.model}) ...")
        system = System(
            SystemConfig(
                redis_url=url,
                run_dir=str(run_dir),
                method=opts.method,
                model=opts.model,
                namespace=namespace,
                replicas=opts.replicas,
                method_options=method_options(opts.method, opts.checkpoint),
            )
        ).start()
        stack.callback(system.stop)
        show = facts[: opts.showcase]
        before = system.ask([f.prompt for f in show])
        feed_s = feed(store, facts, opts.rate)
        last = store.last_seq()
        converged = system.wait_for_version(last, timeout_s=opts.timeout_s)
        done_s = time.time()
        after = system.ask([f.prompt for f in show], min_version=last, max_new_tokens=24)
        para = system.ask([f.paraphrases[0] for f in show if f.paraphrases], min_version=last, max_new_tokens=24)
        chat = system.ask([f.prompt for f in show], min_version=last, max_new_tokens=24, chat=True)
        wild_scores = wild_summary(system, facts, last)
        if not system.wait_for_evaluation(rounds=1, timeout_s=120, min_version=last):
            log.warning("the evaluator probed no replica at the final version in 120 s (see Ray's worker logs)")
        latencies = edit_log(system, store, run_dir)
        states = system.replica_states()
        journal = store.journal_after(0, count=10**7)
        ids = [e.payload["edit_id"] for e in journal]
        summary = {
            "facts": len(facts),
            "accepted": len(journal),
            "applied": min(s["version"] for s in states),
            "lost": len({f.edit_id for f in facts} - set(ids)),
            "duplicated": len(ids) - len(set(ids)),
            "dlq": store.dlq_size(),
            "converged": converged and len({(s["version"], s["digest"]) for s in states}) == 1,
            "replicas": [{"name": s["name"], "version": s["version"], "digest": s["digest"]} for s in states],
            "edit_latency_ms": {
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
                "mean": round(statistics.fmean(latencies), 1) if latencies else None,
            },
            "throughput_facts_per_s": round(len(journal) / max(done_s - (journal[0].at_ms / 1000), 1e-9), 1)
            if journal
            else 0.0,
            "feed_seconds": round(feed_s, 2),
            "examples": [
                {
                    "prompt": f.prompt,
                    "target": f.target,
                    "before": b["text"].strip(),
                    "after": a["text"].strip(),
                    "answer": wild.cut(a["text"], f.target),
                    "chat_answer": wild.cut(c["text"], f.target),
                    "fired": a["fired"],
                }
                for f, b, a, c in zip(show, before, after, chat, strict=True)
            ],
            "paraphrase_examples": [
                {"prompt": p["prompt"], "after": p["text"].strip(), "answer": wild.cut(p["text"])} for p in para
            ],
            "wild": wild_scores,
            "run_dir": str(run_dir),
            "method": opts.method,
            "model": opts.model,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def wild_summary(system: System, facts: list[EditRequest], version: int, batch: int = 32) -> dict[str, Any]:
    """WILD scores of the run on replica-0, as a user reads the answers: greedy, cut at the first ".",
    newline or end, answer-first and exact, on every fact's prompt and first paraphrase."""
    rows: dict[str, list[float]] = {}
    for name, pairs in (
        ("reliability", [(f.prompt, f.target) for f in facts]),
        ("generality", [(f.paraphrases[0], f.target) for f in facts if f.paraphrases]),
    ):
        for i in range(0, len(pairs), batch):
            part = pairs[i : i + batch]
            answers = system.ask([p for p, _ in part], min_version=version, max_new_tokens=50, until_cut=True)
            for (_, target), a in zip(part, answers, strict=True):
                answer = wild.cut(a["text"], target)
                rows.setdefault(name, []).append(float(wild.answer_first(answer, target)))
                rows.setdefault(f"exact_{name}", []).append(float(wild.exact(answer, target)))
    return {k: round(statistics.fmean(v), 3) for k, v in rows.items() if v}


def print_summary(s: dict[str, Any]) -> None:
    print("\nWhat changed (replica-0, greedy; the answer is cut at the first '.', newline or end, as a user reads it):")
    for ex in s["examples"]:
        print(
            f"  {ex['prompt']!r}\n    before: {ex['before']!r}\n    after:  {ex['answer']!r}   "
            f"(edit {ex['fired']}; uncut: {ex['after']!r})\n    as a chat question: {ex['chat_answer']!r}"
        )
    for ex in s["paraphrase_examples"]:
        print(f"  paraphrase {ex['prompt']!r} -> {ex['answer']!r}   (uncut: {ex['after']!r})")
    w = s.get("wild") or {}
    if w:
        print(
            f"\nWILD over all {s['facts']} facts (answer-first / exact): prompts {w.get('reliability')} / "
            f"{w.get('exact_reliability')}, paraphrases {w.get('generality')} / {w.get('exact_generality')}"
        )
    lat = s["edit_latency_ms"]
    print(
        f"\nfacts {s['facts']}, accepted {s['accepted']}, applied on every replica {s['applied']}, "
        f"lost {s['lost']}, duplicated {s['duplicated']}, dead-lettered {s['dlq']}"
    )
    print(
        "replicas: "
        + ", ".join(f"{r['name']} v{r['version']} {r['digest']}" for r in s["replicas"])
        + ("  (converged)" if s["converged"] else "  (NOT converged)")
    )
    print(
        f"throughput {s['throughput_facts_per_s']} facts/s; edit latency XADD->all replicas "
        f"p50 {lat['p50']} ms, p99 {lat['p99']} ms"
    )
    print(f"run directory: {s['run_dir']} (Arrow logs: eval/, edits/)")
