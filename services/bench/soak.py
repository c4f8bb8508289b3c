"""Soak benchmark: a long stream through the running system, snapshots and compaction on, sampled
as it goes, to show what grows with the live edits and what stays bounded.

On a private redis-server (AOF on) and local Ray: the pipeline as `serve --snapshot-dir DIR
--compact` runs it (RECIPE by default, 2 replicas, 1 editor, no evaluator), fed by a producer of
plain XADDs: synthetic facts at `rate`/s, with a share of supersedes (a newer fact for an earlier
prompt) and retracts spread through the run. Every `every_s` seconds a sample goes to the run's
Arrow log `soak` (`<run_dir>/run/soak/`): Redis used memory and the namespace's own bytes, stream
lengths (facts, journal, DLQ, announcements), the compaction mark, each replica's version and
resident memory, and the live edits. At the end: the XADD -> applied-on-every-replica latency per
tenth of the journal (from the replicas' edit logs), lost and double-applied checks, digests, and
the growth of Redis and replica memory per live edit between the first and the last tenth.
Replica memory is read from /proc: the replicas must run on this machine (local Ray).
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from editstream.arrowlog import ArrowLog, read_log
from editstream.bench.cost import rss_bytes
from editstream.edits import EditRequest
from editstream.events import event_fields
from services.bench.snapshots import CITIES, synthetic_facts
from services.transport.store import RedisStore, connect
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)

SOAK_SCHEMA = pa.schema(
    [
        ("elapsed_s", pa.float64()),
        ("sent", pa.int64()),  # events the producer has sent (facts, supersedes, retracts)
        ("journal_seq", pa.int64()),
        ("compacted_below", pa.int64()),
        ("live_edits", pa.int64()),  # active edits on replica-0
        ("min_version", pa.int64()),
        ("max_version", pa.int64()),
        ("redis_used_bytes", pa.int64()),  # INFO memory used_memory (the whole server)
        ("namespace_bytes", pa.int64()),  # MEMORY USAGE of the namespace's keys
        ("facts_len", pa.int64()),
        ("journal_len", pa.int64()),
        ("dlq_len", pa.int64()),
        ("announce_len", pa.int64()),
        ("replica_rss_max_bytes", pa.int64()),
        ("replica_rss_mean_bytes", pa.int64()),
    ],
    metadata={"editstream.schema": "soak", "editstream.schema_version": "1"},
)


@dataclass
class SoakOptions:
    facts: int = 100_000
    rate: float = 150.0  # events per second; 0: as fast as the producer can send
    method: str = "recipe"
    model: str = "smollm2-135m"
    replicas: int = 2
    every_s: float = 10.0
    snapshot_every: int = 10_000
    supersede: float = 0.05
    retract: float = 0.02
    seed: int = 0
    timeout_s: float = 600.0  # for the replicas to catch up after the producer's last event
    options: dict[str, Any] = field(default_factory=dict)  # method options, e.g. {"encoder_int8": True}


class Producer:
    """Synthetic facts, with supersedes of earlier prompts and retracts of earlier edits mixed in.
    Only an edit never superseded is retracted and only a prompt never retracted is superseded,
    so the live edits afterwards are simply facts - retracts."""

    def __init__(self, store: RedisStore, options: SoakOptions) -> None:
        self.store, self.o = store, options
        self.rng = random.Random(options.seed)
        self.sent = {"edit": 0, "supersede": 0, "retract": 0}
        self.edit_ids: list[str] = []
        self._plain: list[EditRequest] = []  # edits neither superseded nor retracted yet
        self.done = threading.Event()

    def events(self):
        for fact in synthetic_facts(self.o.facts, self.o.seed):
            yield "edit", event_fields(fact)
            self._plain.append(fact)
            roll = self.rng.random()
            if roll < self.o.supersede + self.o.retract and len(self._plain) > 1:
                old = self._plain.pop(self.rng.randrange(len(self._plain) - 1))  # never the one just sent
                if roll < self.o.supersede:
                    target = self.rng.choice(CITIES)
                    newer = EditRequest(old.prompt, target, edit_id=f"{old.edit_id}-v2", subject=old.subject)
                    yield "supersede", event_fields(newer)
                else:
                    yield "retract", {"op": "retract", "retracts": old.edit_id, "edit_id": f"r-{old.edit_id}"}

    def run(self) -> None:
        started = time.time()
        try:
            for i, (kind, fields) in enumerate(self.events()):
                if self.o.rate > 0:
                    delay = started + i / self.o.rate - time.time()
                    if delay > 0:
                        time.sleep(delay)
                self.store.r.xadd(self.store.keys.facts, fields)
                self.sent[kind] += 1
                self.edit_ids.append(fields["edit_id"])
        finally:
            self.done.set()

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _sample(system: System, store: RedisStore, producer: Producer, pids: dict[str, int], started: float) -> dict:
    states = system.replica_states()
    rss = [rss_bytes(pid) for pid in pids.values()]
    r, k = store.r, store.keys
    return {
        "elapsed_s": round(time.time() - started, 2),
        "sent": producer.total,
        "journal_seq": store.last_seq(),
        "compacted_below": store.compacted(),
        "live_edits": int(states[0]["edits"]),
        "min_version": min(s["version"] for s in states),
        "max_version": max(s["version"] for s in states),
        "redis_used_bytes": int(r.info("memory")["used_memory"]),
        "namespace_bytes": sum(store.memory_by_key().values()),
        "facts_len": int(r.xlen(k.facts)),
        "journal_len": int(r.xlen(k.journal)),
        "dlq_len": int(r.xlen(k.dlq)) + int(r.xlen(k.journal_dlq)),
        "announce_len": int(r.xlen(k.announce)),
        "replica_rss_max_bytes": max(rss),
        "replica_rss_mean_bytes": int(statistics.fmean(rss)),
    }


def run_soak(url: str, run_dir: Path, options: SoakOptions) -> dict[str, Any]:
    """The soak on Redis at `url` (a private server: it reads the whole server's memory)."""
    o = options
    config = SystemConfig(
        redis_url=url,
        run_dir=str(run_dir / "run"),
        method=o.method,
        model=o.model,
        namespace=f"soak-{uuid.uuid4().hex[:6]}",
        replicas=o.replicas,
        evaluators=0,
        method_options=o.options,
        snapshot_dir=str(run_dir / "snapshots"),
        snapshot_every=o.snapshot_every,
        compact=True,
    )
    system = System(config).start()
    store = RedisStore(connect(url), config.namespace)
    samples = ArrowLog(run_dir / "run", "soak", SOAK_SCHEMA)
    rows: list[dict] = []
    try:
        pids = {n: ray.get(system.handle(n).pid.remote()) for n in system.replica_names()}
        producer = Producer(store, o)
        thread = threading.Thread(target=producer.run, name="soak-producer", daemon=True)
        started = time.time()
        thread.start()
        caught_up_by = None
        while True:
            time.sleep(o.every_s)
            rows.append(_sample(system, store, producer, pids, started))
            samples.append(rows[-1:])
            last = rows[-1]
            log.info(
                "soak %.0f s: sent %d, journal %d, replicas %d-%d, live %d, Redis %.1f MB, replica RSS %.0f MB",
                last["elapsed_s"], last["sent"], last["journal_seq"], last["min_version"], last["max_version"],
                last["live_edits"], last["redis_used_bytes"] / 1e6, last["replica_rss_max_bytes"] / 1e6,
            )  # fmt: skip
            if producer.done.is_set():
                caught_up_by = caught_up_by or time.time() + o.timeout_s
                if last["min_version"] >= last["journal_seq"] >= producer.total or time.time() > caught_up_by:
                    break
        thread.join()
        states = system.replica_states()
        ids_known = store.r.hmget(store.keys.ids, producer.edit_ids) if producer.edit_ids else []
    finally:
        samples.close()
        system.stop()  # flushes the replicas' edit logs
    return _summary(o, producer, rows, states, sum(v is None for v in ids_known), run_dir / "run")


def _latency_by_tenth(run_dir: Path, replicas: int, journal: int) -> list[dict]:
    """p50/p99 of XADD -> applied on every replica, per tenth of the journal's seqs."""
    table = read_log(run_dir, "edits").select(["seq", "replica", "latency_ms"]).to_pylist()
    per_seq: dict[int, list[float]] = {}
    for row in table:
        per_seq.setdefault(row["seq"], []).append(row["latency_ms"])
    worst = {seq: max(v) for seq, v in per_seq.items() if len(v) == replicas}
    out = []
    for tenth in range(10):
        lo, hi = tenth * journal // 10, (tenth + 1) * journal // 10
        values = sorted(v for seq, v in worst.items() if lo < seq <= hi)
        if values:
            out.append({
                "seqs": [lo + 1, hi],
                "p50_ms": round(values[len(values) // 2], 1),
                "p99_ms": round(values[min(len(values) - 1, int(0.99 * len(values)))], 1),
            })  # fmt: skip
    return out


def _growth(rows: list[dict], field: str) -> float | None:
    """Bytes of `field` added per live edit between the sample at a tenth of the run and the last."""
    if len(rows) < 3:
        return None
    first, last = rows[max(1, len(rows) // 10)], rows[-1]
    edits = last["live_edits"] - first["live_edits"]
    return round((last[field] - first[field]) / edits, 1) if edits > 0 else None


def _summary(
    o: SoakOptions, producer: Producer, rows: list[dict], states: list[dict], unknown_ids: int, run_dir: Path
) -> dict:
    last = rows[-1]
    expected_live = producer.sent["edit"] - producer.sent["retract"]
    return {
        "method": o.method,
        "replicas": o.replicas,
        "rate": o.rate,
        "options": o.options,
        "facts": o.facts,
        "sent": dict(producer.sent),
        "journaled": last["journal_seq"],
        "lost": unknown_ids,  # sent edit_ids the journal never saw
        "applied_per_replica": {s["name"]: s["version"] for s in states},
        "digests_agree": len({s["digest"] for s in states}) == 1,
        "live_edits": {"expected": expected_live, "replicas": sorted({s["edits"] for s in states})},
        "seconds": last["elapsed_s"],
        "samples": len(rows),
        "every_s": o.every_s,
        "snapshot_every": o.snapshot_every,
        "compacted_below": last["compacted_below"],
        "max": {
            "journal_len": max(r["journal_len"] for r in rows),
            "facts_len": max(r["facts_len"] for r in rows),
            "announce_len": max(r["announce_len"] for r in rows),
            "dlq_len": max(r["dlq_len"] for r in rows),
            "redis_used_bytes": max(r["redis_used_bytes"] for r in rows),
            "replica_rss_bytes": max(r["replica_rss_max_bytes"] for r in rows),
        },
        "end": {k: last[k] for k in ("redis_used_bytes", "namespace_bytes", "replica_rss_max_bytes", "live_edits")},
        "growth_bytes_per_live_edit": {
            "redis_namespace": _growth(rows, "namespace_bytes"),
            "redis_used": _growth(rows, "redis_used_bytes"),
            "replica_rss": _growth(rows, "replica_rss_max_bytes"),
        },
        "latency_by_tenth": _latency_by_tenth(run_dir, o.replicas, last["journal_seq"]),
    }


def plot(run_dir: Path, path: Path, title: str) -> None:
    """Four panels over the run: Redis memory, replica RSS, stream lengths, live edits and journal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = read_log(run_dir, "soak").to_pydict()
    x = [s / 60 for s in t["elapsed_s"]]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(x, [b / 1e6 for b in t["redis_used_bytes"]], label="server used")
    ax[0, 0].plot(x, [b / 1e6 for b in t["namespace_bytes"]], label="namespace keys")
    ax[0, 0].set(title="Redis memory (MB)", xlabel="minutes")
    ax[0, 1].plot(x, [b / 1e6 for b in t["replica_rss_max_bytes"]], label="max")
    ax[0, 1].plot(x, [b / 1e6 for b in t["replica_rss_mean_bytes"]], label="mean")
    ax[0, 1].set(title="replica resident memory (MB)", xlabel="minutes")
    for name in ("facts_len", "journal_len", "announce_len", "dlq_len"):
        ax[1, 0].plot(x, t[name], label=name.removesuffix("_len"))
    ax[1, 0].set(title="stream lengths (entries)", xlabel="minutes")
    ax[1, 1].plot(x, t["live_edits"], label="live edits")
    ax[1, 1].plot(x, t["journal_seq"], label="journal seq")
    ax[1, 1].plot(x, t["compacted_below"], label="compacted below")
    ax[1, 1].set(title="edits", xlabel="minutes")
    for a in ax.flat:
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
