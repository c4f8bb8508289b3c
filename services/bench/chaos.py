"""`editstream bench chaos`: the running system under faults, checked from outside.

A private redis-server (AOF `always`) and the pipeline (2 replicas, the given method) run while:

* a producer (plain redis-py XADD, not `feed`) sends valid facts, exact duplicates, supersedes
  (another target for an earlier prompt), retracts of earlier edits, and every hostile kind of
  `editstream.hostile` plus journal-dependent ones (an edit_id reused with other content, a retract
  of an unknown id);
* every `kill_every_s` a random actor (ingest, an editor, a replica, the evaluator) is killed with
  SIGKILL, and Redis is killed and restarted once, half way.

At the end, once the producer stopped and every replica caught up, it checks and writes JSON: facts
sent / journaled / lost, entries applied per replica and applied twice (from the replicas' edit
logs), dead-lettered by kind with their reasons (each hostile kind must be there), replica
versions and digests, and per kill the seconds until the actor answered again (a replica: until it
was ready again at the version the other replica had when it was killed, `catch_up_to`; the
journal's head can be far ahead of what a slow method's editors have computed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import ray
import redis

from editstream.arrowlog import read_log
from editstream.demo_facts import demo_facts
from editstream.events import event_fields
from editstream.hostile import HOSTILE
from services.transport.redis_server import RedisServer
from services.transport.store import RedisStore, connect
from services.wiring.clients import ReplicaClient
from services.wiring.demo import method_options
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)


class Producer(threading.Thread):
    """Sends the mixed stream at `rate` events/s, riding out the Redis restart; records what it sent."""

    def __init__(self, url: str, namespace: str, rate: float, seconds: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.store = RedisStore(connect(url), namespace)
        self.rate, self.seconds, self.rng = rate, seconds, random.Random(seed)
        self.facts = iter(demo_facts(int(rate * seconds) + 100))
        self.sent_facts: list = []  # valid facts sent, to send again as exact duplicates
        self.valid: list[str] = []  # edit ids of valid facts sent (first time)
        self.live: list[tuple[str, str]] = []  # (edit id, prompt) of edits that can be superseded/retracted
        self.sent: Counter[str] = Counter()
        self.bad_ids: dict[str, str] = {}  # facts-stream entry id -> hostile kind
        self.stop_event = threading.Event()

    def _xadd(self, fields: dict) -> str:
        while not self.stop_event.is_set():
            try:
                return self.store.r.xadd(self.store.keys.facts, fields).decode()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.1)
        return ""

    def _one(self) -> None:
        roll = self.rng.random()
        if roll < 0.70 or not self.live or not self.sent_facts:
            fact = next(self.facts)
            self._xadd(event_fields(fact))
            self.sent_facts.append(fact)
            self.valid.append(fact.edit_id)
            self.live.append((fact.edit_id, fact.prompt))
            self.sent["valid"] += 1
        elif roll < 0.75:
            self._xadd(event_fields(self.rng.choice(self.sent_facts)))  # an exact duplicate: applied once
            self.sent["duplicate"] += 1
        elif roll < 0.80:
            i = self.rng.randrange(len(self.live))
            edit_id, prompt = self.live[i]
            new_id = f"supersede-{uuid.uuid4().hex[:10]}"
            self._xadd({"edit_id": new_id, "prompt": prompt, "target": f"Target {self.sent['supersede']}"})
            self.live[i] = (new_id, prompt)
            self.valid.append(new_id)
            self.sent["supersede"] += 1
        elif roll < 0.83:
            edit_id, _ = self.live.pop(self.rng.randrange(len(self.live)))
            self._xadd({"op": "retract", "retracts": edit_id})
            self.sent["retract"] += 1
        else:
            kinds = [*HOSTILE, "edit_id reused", "retract of unknown id"]
            kind = kinds[self.sent["bad"] % len(kinds)]
            if kind == "edit_id reused":
                fields = {"edit_id": self.valid[0], "prompt": "A prompt never seen", "target": "x"}
            elif kind == "retract of unknown id":
                fields = {"op": "retract", "retracts": f"never-{uuid.uuid4().hex[:8]}"}
            else:
                fields = {k: str(v) if isinstance(v, int) else v for k, v in HOSTILE[kind][0].items()}
            self.bad_ids[self._xadd(fields)] = kind
            self.sent["bad"] += 1

    def run(self) -> None:
        started = time.time()
        n = 0
        while not self.stop_event.is_set() and time.time() - started < self.seconds:
            time.sleep(max(0.0, started + n / self.rate - time.time()))
            self._one()
            n += 1


def _kill(system: System, name: str) -> float:
    pid = ray.get(system.handle(name).pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def _peer_version(system: System, name: str) -> int | None:
    """The highest version another replica had applied (what a restarted `name` must reach again:
    the journal's head may be ahead of what the editors have computed, with a slow method)."""
    versions = []
    for other in system.names("replica"):
        if other != name:
            with contextlib.suppress(ray.exceptions.RayError):
                versions.append(ray.get(ReplicaClient(system.handle(other)).state(), timeout=5)["version"])
    return max(versions, default=None)


def _recovered(system: System, name: str, killed_at: float, target: int | None, timeout_s: float = 300) -> float | None:
    """Seconds from the kill until the actor answers (a replica: until it is ready and has applied
    `target`, the version a live peer had at the kill)."""
    deadline = killed_at + timeout_s
    while time.time() < deadline:
        try:
            if name.startswith("replica"):
                state = ray.get(ReplicaClient(system.handle(name)).state(), timeout=5)
                if state["version"] >= (target or 0) and state["ready"]:
                    return round(time.time() - killed_at, 2)
            else:
                ray.get(system.handle(name).ping.remote(), timeout=5)
                return round(time.time() - killed_at, 2)
        except (ray.exceptions.RayError, redis.RedisError):
            pass
        time.sleep(0.2)
    return None


def _watch(system: System, record: dict, killed_at: float) -> None:
    record["recovered_s"] = _recovered(system, record["actor"], killed_at, record.get("catch_up_to"))


def _converge(system: System, store: RedisStore, timeout_s: float) -> list[dict]:
    deadline = time.time() + timeout_s
    states: list[dict] = []
    while time.time() < deadline:
        try:
            head = store.last_seq()
            states = system.replica_states()
            caught_up = all(s["version"] == head and not s.get("busy") for s in states)
            if store.ingest_lag() == 0 and caught_up and len({s["digest"] for s in states}) == 1:
                return states
        except (ray.exceptions.RayError, redis.RedisError):
            pass
        time.sleep(0.5)
    return states


def run_chaos(
    method: str,
    minutes: float,
    run_dir: Path,
    rate: float = 20.0,
    kill_every_s: float = 10.0,
    checkpoint: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory=run_dir / "redis")
    server.start()
    server_cfg = connect(server.url)
    server_cfg.config_set("appendfsync", "always")
    namespace = f"chaos-{uuid.uuid4().hex[:6]}"
    store = RedisStore(connect(server.url), namespace)
    editors = 2 if method == "scen" else 1
    system = System(
        SystemConfig(
            redis_url=server.url,
            run_dir=str(run_dir / "run"),
            method=method,
            namespace=namespace,
            replicas=2,
            editors=editors,
            evaluators=1,
            method_options=method_options(method, checkpoint),
        )
    ).start()
    producer = Producer(server.url, namespace, rate, minutes * 60, seed)
    kills: list[dict[str, Any]] = []
    watchers: list[threading.Thread] = []
    redis_restart: dict[str, Any] = {}
    try:
        producer.start()
        started = time.time()
        while producer.is_alive():
            time.sleep(kill_every_s)
            if not redis_restart and time.time() - started > minutes * 30:
                t = time.time()
                server.kill()
                time.sleep(1.0)
                server.start()
                redis_restart = {"at_s": round(t - started, 1), "down_s": round(time.time() - t, 2)}
                continue
            victim = rng.choice(system.names("replica") + system.names("editor") + ["ingest", "evaluator-0"])
            peer = _peer_version(system, victim) if victim.startswith("replica") else None
            try:
                killed_at = _kill(system, victim)
            except (ray.exceptions.RayError, ProcessLookupError) as exc:
                kills.append({"actor": victim, "error": repr(exc)})
                continue
            record = {"actor": victim, "at_s": round(killed_at - started, 1), "recovered_s": None}
            if peer is not None:
                record["catch_up_to"] = peer
            kills.append(record)
            watcher = threading.Thread(target=_watch, args=(system, record, killed_at), daemon=True)
            watcher.start()
            watchers.append(watcher)
        producer.join()
        for watcher in watchers:
            watcher.join(timeout=300)
        states = _converge(system, store, timeout_s=600)
        report = _check(system, store, producer, states, run_dir)
    finally:
        producer.stop_event.set()
        system.stop()
        server.stop()
    return {
        "method": method,
        "minutes": minutes,
        "rate": rate,
        "kills": kills,
        "redis_restart": redis_restart,
        **report,
    }


def _check(system: System, store: RedisStore, producer: Producer, states: list[dict], run_dir: Path) -> dict:
    journal = store.journal_after(0, count=10**8)
    journaled = {e.payload["edit_id"] for e in journal if e.payload["op"] == "edit"}
    lost = sorted(set(producer.valid) - journaled)
    system.stop()  # closes the edit logs so they can be read whole
    rows = read_log(run_dir / "run", "edits").select(["replica", "seq"]).to_pylist()
    applied: dict[str, Counter[int]] = {}
    for r in rows:
        applied.setdefault(r["replica"], Counter())[r["seq"]] += 1
    dlq = store.r.xrange(store.keys.dlq)
    by_kind: dict[str, list[str]] = {}
    for _, fields in dlq:
        kind = producer.bad_ids.get(fields[b"source_id"].decode(), "other")
        by_kind.setdefault(kind, []).append(fields[b"reason"].decode())
    return {
        "sent": dict(producer.sent),
        "journaled": len(journal),
        "valid_sent": len(producer.valid),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "applied_per_replica": {k: len(v) for k, v in applied.items()},
        "applied_twice": {k: sum(1 for c in v.values() if c > 1) for k, v in applied.items()},
        "dead_lettered": len(dlq),
        "bad_sent": len(producer.bad_ids),
        "bad_kinds_sent": len(set(producer.bad_ids.values())),
        "dead_lettered_by_kind": {k: {"n": len(v), "reason": v[0]} for k, v in sorted(by_kind.items())},
        "bad_events_dead_lettered_twice": len(dlq) - len({f[b"source_id"] for _, f in dlq}),
        "bad_kinds_without_dlq": sorted(set(producer.bad_ids.values()) - set(by_kind)),
        "replicas": [{"name": s["name"], "version": s["version"], "digest": s["digest"]} for s in states],
        "converged": len({(s["version"], s["digest"]) for s in states}) == 1 and bool(states),
        "journal_dead_letters": store.r.xlen(store.keys.journal_dlq),
    }


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"chaos-{doc['method']}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
