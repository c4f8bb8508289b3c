"""The system commands behind the CLI: serve, feed, ask, retract, status."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from editstream.data import load_edits, read_records
from editstream.edits import EditRequest
from services.demo import feed, method_options
from services.store import RedisStore, connect
from services.system import System, SystemConfig

log = logging.getLogger(__name__)


def ray_connect(address: str | None, namespace: str) -> None:
    """Join `address` (or $RAY_ADDRESS); with neither, start a local Ray instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), namespace=namespace, include_dashboard=False, log_to_driver=False)


def serve(
    redis_url: str,
    namespace: str,
    method: str,
    model: str,
    replicas: int,
    run_dir: str,
    address: str | None,
    checkpoint: str | None,
    status_every_s: float = 10.0,
) -> int:
    """Run the pipeline until interrupted; supervise actors and print status lines."""
    ray_connect(address, namespace)
    system = System(
        SystemConfig(
            redis_url=redis_url,
            run_dir=run_dir,
            method=method,
            model=model,
            namespace=namespace,
            replicas=replicas,
            method_options=method_options(method, checkpoint),
        )
    ).start()
    store = RedisStore(connect(redis_url), namespace)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"serving {method} on {model}: {replicas} replicas; facts stream {store.keys.facts}; Ctrl-C stops")
    try:
        while not stop.wait(status_every_s):
            system.supervise()
            print(status_line(status(store)), flush=True)
    finally:
        system.stop()
    return 0


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


def feed_file(redis_url: str, namespace: str, source: str, rate: float, limit: int | None) -> int:
    store = RedisStore(connect(redis_url), namespace)
    edits = read_feed(source)[:limit]
    seconds = feed(store, edits, rate)
    print(f"fed {len(edits)} facts to {store.keys.facts} in {seconds:.1f} s")
    return 0


def retract(redis_url: str, namespace: str, edit_id: str) -> int:
    store = RedisStore(connect(redis_url), namespace)
    entry = store.r.xadd(store.keys.facts, {"op": "retract", "retracts": edit_id})
    print(f"retract of {edit_id} queued as {entry.decode()}")
    return 0


def ask(namespace: str, prompt: str, replica: str, min_version: int, max_new_tokens: int, address: str | None) -> int:
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=namespace, log_to_driver=False)
    try:
        handle = ray.get_actor(f"{namespace}:{replica}")
    except ValueError:
        print(f"no replica {replica!r} in namespace {namespace!r}: is `editstream serve` running?", file=sys.stderr)
        return 2
    (answer,) = ray.get(handle.call.remote("ask", [prompt], max_new_tokens, min_version))
    print(json.dumps(answer, indent=2))
    return 0


def status(store: RedisStore) -> dict[str, Any]:
    now_ms = time.time() * 1000
    recent = store.r.xrevrange(store.keys.journal, count=1000)
    last_10s = sum(1 for _, f in recent if now_ms - float(f[b"at"]) <= 10_000)
    return {
        "journal": store.last_seq(),
        "facts_stream": store.facts_size(),
        "ingest_lag": store.ingest_lag(),
        "dlq": store.dlq_size(),
        "edits_per_s_10s": round(last_10s / 10, 1),
        "replicas": store.replica_heartbeats(),
    }


def status_line(s: dict[str, Any]) -> str:
    reps = ", ".join(f"{n} v{r['version']}" for n, r in sorted(s["replicas"].items()))
    return (
        f"journal {s['journal']} | lag {s['ingest_lag']} | dlq {s['dlq']} | "
        f"{s['edits_per_s_10s']} edits/s | {reps or 'no replicas'}"
    )
