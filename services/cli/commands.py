"""The system commands behind the CLI: serve, feed, ask, retract, status."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import redis

from editstream.data import load_edits, read_records
from editstream.edits import EditRequest
from editstream.errors import InvalidEditError
from editstream.events import event_fields, parse_event
from services.transport.store import RedisStore, connect, status
from services.wiring.clients import ReplicaClient
from services.wiring.demo import feed
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)


def ray_connect(address: str | None, namespace: str) -> None:
    """Join `address` (or $RAY_ADDRESS); with neither, start a local Ray instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), namespace=namespace, include_dashboard=False, log_to_driver=False)


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    write_token: str | None = None


def serve(
    config: SystemConfig, address: str | None, http: HttpOptions | None = None, status_every_s: float = 10.0
) -> int:
    """Run the pipeline until interrupted: apply `scale` requests, replace lost actors, print status."""
    ray_connect(address, config.namespace)
    system = System(config).start()
    store = system.store
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    url = ""
    if http is not None:
        from services.http.gateway import start_http

        url = start_http(
            config.redis_url, config.namespace, config.model, http.host, http.port, http.token, http.write_token
        )
    print(
        f"serving {config.method} on {config.model}: {config.replicas} replicas, {config.editors} editors; "
        f"facts stream {store.keys.facts}{'; HTTP ' + url if url else ''}; Ctrl-C stops",
        flush=True,
    )
    last_status, outage_since = time.time(), None
    try:
        while not stop.wait(1.0):
            try:
                store.mark_serving({"pid": os.getpid(), "time": time.time(), "http": url})
                system.reconcile()
                if outage_since is not None:
                    log.warning("Redis is back after %.1f s; carrying on", time.time() - outage_since)
                    outage_since = None
                if time.time() - last_status >= status_every_s:
                    last_status = time.time()
                    system.supervise()
                    print(status_line(status(store)), flush=True)
            except redis.RedisError as exc:  # ride out an outage: actors retry on their own, so do we
                if outage_since is None:
                    outage_since = time.time()
                    log.warning("Redis unreachable (%s); retrying every second", exc)
            except ray.exceptions.RayError as exc:  # a node lost mid-call: the next round tries again
                log.warning("supervising the actors failed this round: %s", exc)
    finally:
        with contextlib.suppress(redis.RedisError):
            store.r.delete(store.keys.serving)
        if url:
            from ray import serve as ray_serve

            ray_serve.shutdown()
        system.stop()
    return 0


def scale(redis_url: str, namespace: str, counts: dict[str, int], wait_s: float) -> int:
    """Ask the running `serve` loop for new actor counts; wait until the replicas are ready."""
    store = RedisStore(connect(redis_url), namespace)
    if store.serving() is None:
        print(f"no `editstream serve` is running for namespace {namespace!r}; nothing to scale", file=sys.stderr)
        return 2
    store.set_desired(counts)
    print("asked for " + ", ".join(f"{n} {k}s" for k, n in counts.items()), flush=True)
    if "replica" not in counts or wait_s <= 0:
        return 0
    deadline = time.time() + wait_s
    while time.time() < deadline:
        ready = store.ready_replicas()
        if len(ready) == counts["replica"]:
            print(f"{len(ready)} replicas ready: {', '.join(ready)}")
            return 0
        time.sleep(0.5)
    print(f"replicas not all ready after {wait_s:.0f} s; `editstream status` shows where they are", file=sys.stderr)
    return 1


def read_feed(source: str) -> list[EditRequest]:
    """Edits from a dataset/JSON/JSONL file, or JSON lines on standard input ('-')."""
    if source != "-":
        return load_edits(source)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"editstream-feed-{os.getpid()}.jsonl"
    tmp.write_text(sys.stdin.read())
    try:
        read_records(tmp)  # fail early on bad JSON
        return load_edits(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def check_contract(edits: list[EditRequest]) -> list[str]:
    """What the wire contract would dead-letter among `edits`, one line each (empty: all fine)."""
    problems = []
    for i, edit in enumerate(edits):
        try:
            parse_event(event_fields(edit))
        except InvalidEditError as exc:
            problems.append(f"record {i} ({edit.edit_id}): {exc}")
    return problems


def feed_file(redis_url: str, namespace: str, source: str, rate: float, limit: int | None) -> int:
    edits = read_feed(source)[:limit]
    problems = check_contract(edits)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InvalidEditError(
            f"{source}: nothing sent; {len(problems)} facts break the wire contract{more}:\n  "
            + "\n  ".join(problems[:10])
        )
    store = RedisStore(connect(redis_url), namespace)
    store.r.ping()  # fail before the progress bar if Redis is not there
    seconds = feed(store, edits, rate)
    print(f"fed {len(edits)} facts to {store.keys.facts} in {seconds:.1f} s")
    return 0


def retract(redis_url: str, namespace: str, edit_id: str) -> int:
    store = RedisStore(connect(redis_url), namespace)
    entry = store.r.xadd(store.keys.facts, {"op": "retract", "retracts": edit_id})
    print(f"retract of {edit_id} queued as {entry.decode()}")
    return 0


def rollback_plan(store: RedisStore, to_version: int) -> tuple[list[str], list[str]]:
    """The edit_ids to retract, newest first, so that the edits after `to_version` are gone; and the
    retracts after `to_version` of edits that were in effect at it and still are not (a retract cannot
    undo those; re-sending the fact can). An edit_id whose first operation after `to_version` is an
    edit was not in effect at it (the journal refuses a second edit of an id in effect)."""
    first: dict[str, str] = {}  # edit_id -> its first operation after to_version
    now: dict[str, int] = {}  # edit_id -> seq of the edit in effect now (0: retracted)
    for e in store.journal_after(to_version, count=10**9):
        edit_id = e.payload["edit_id"] if e.payload["op"] == "edit" else e.payload["retracts"]
        first.setdefault(edit_id, e.payload["op"])
        now[edit_id] = e.seq if e.payload["op"] == "edit" else 0
    undo = sorted((i for i, seq in now.items() if seq and first[i] == "edit"), key=now.__getitem__, reverse=True)
    lost = sorted(i for i, seq in now.items() if not seq and first[i] == "retract")
    return undo, lost


def rollback(redis_url: str, namespace: str, to_version: int, wait_s: float) -> int:
    """Queue retracts of every edit after `to_version`, newest first; wait until replicas applied them."""
    store = RedisStore(connect(redis_url), namespace)
    last = store.last_seq()
    if not 0 <= to_version <= last:
        print(f"--to-version {to_version} is outside the journal (0..{last})", file=sys.stderr)
        return 2
    earliest = max(0, store.compacted() - 1)
    if to_version < earliest:
        print(
            f"--to-version {to_version}: the journal is compacted below seq {earliest + 1}, so what came after "
            f"{to_version} is no longer known; the earliest version a rollback can reach is {earliest}",
            file=sys.stderr,
        )
        return 2
    undo, lost = rollback_plan(store, to_version)
    if lost:
        print(
            f"{len(lost)} edits at or before version {to_version} were retracted after it ({', '.join(lost[:5])}"
            f"{'...' if len(lost) > 5 else ''}); a rollback cannot bring them back: re-send them as facts",
            file=sys.stderr,
        )
    if not undo:
        print(f"nothing to roll back: no edit after version {to_version} is in effect")
        return 0
    pipe = store.r.pipeline(transaction=False)
    for edit_id in undo:
        pipe.xadd(store.keys.facts, {"op": "retract", "retracts": edit_id})
    pipe.execute()
    print(f"queued {len(undo)} retracts (newest edit first) to roll back to version {to_version}", flush=True)
    if wait_s <= 0:
        return 0
    deadline = time.time() + wait_s
    while time.time() < deadline:
        journal = store.last_seq()
        beats = store.replica_heartbeats()
        if journal >= last + len(undo) and beats and all(b["version"] >= journal for b in beats.values()):
            print(f"every replica applied the rollback (now at version {journal})")
            return 0
        time.sleep(0.5)
    print(f"replicas had not applied the rollback after {wait_s:.0f} s; see `editstream status`", file=sys.stderr)
    return 1


def ask(namespace: str, prompt: str, replica: str, min_version: int, max_new_tokens: int, address: str | None) -> int:
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=namespace, log_to_driver=False)
    try:
        handle = ray.get_actor(f"{namespace}:{replica}")
    except ValueError:
        print(f"no replica {replica!r} in namespace {namespace!r}: is `editstream serve` running?", file=sys.stderr)
        return 2
    (answer,) = ray.get(ReplicaClient(handle).ask([prompt], max_new_tokens, min_version))
    print(json.dumps(answer, indent=2))
    return 0


def status_line(s: dict[str, Any]) -> str:
    reps = ", ".join(f"{n} v{r['version']}" for n, r in sorted(s["replicas"].items()))
    return (
        f"journal {s['journal']} | lag {s['ingest_lag']} | dlq {s['dlq']} | "
        f"{s['edits_per_s_10s']} edits/s | {reps or 'no replicas'}"
    )
