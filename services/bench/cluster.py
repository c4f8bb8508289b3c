"""Cluster benchmarks on a running (e.g. local multi-node) Ray cluster.

1. queries: query throughput with 1, 2, 4 replicas (spread over the worker nodes). After `edits`
   edits are applied, `clients` concurrent clients per replica send single-prompt queries (8 new
   tokens) round robin for `seconds`; queries/s and latency percentiles.
2. editors: edit throughput with 1 and 2 editor workers: `facts` new facts sent at once; facts/s
   from the first XADD until every replica applied the last one (editor threads fixed, so the
   comparison is workers, not threads).
The replica and editor sets are changed with `System.scale`, as `editstream scale` does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from editstream.demo_facts import demo_facts
from services.bench.pipeline import _summary
from services.transport.store import RedisStore
from services.wiring.clients import ReplicaClient
from services.wiring.demo import feed
from services.wiring.system import System

log = logging.getLogger(__name__)

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
]


def _wait_replicas(system: System, count: int, version: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = system.replica_states()
        if len(states) == count and all(s["ready"] and s["version"] >= version for s in states):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{count} replicas did not reach version {version} in {timeout_s:.0f} s")


def _load(handles: list[Any], clients: int, seconds: float) -> tuple[list[float], float]:
    """`clients` threads querying `handles` round robin for `seconds`; latencies and wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        k = i
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            ray.get(ReplicaClient(handles[k % len(handles)]).ask([PROMPTS[k % len(PROMPTS)]], 8))
            with lock:
                latencies.append(time.perf_counter() - t)
            k += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def query_throughput(
    system: System, store: RedisStore, counts=(1, 2, 4), seconds: float = 30, clients: int = 2, edits: int = 100
) -> dict[str, Any]:
    feed(store, demo_facts(edits), 0, progress=False)
    out: dict[str, Any] = {"edits_stored": edits, "seconds_per_point": seconds, "clients_per_replica": clients}
    for n in counts:
        system.scale("replica", n)
        _wait_replicas(system, n, edits)
        nodes = sorted(s["node"] for s in system.replica_states())
        handles = system.replica_handles()
        _load(handles, n, 3)  # warm-up
        latencies, wall = _load(handles, clients * n, seconds)
        out[f"replicas_{n}"] = {"queries_per_s": round(len(latencies) / wall, 2), "nodes": nodes, **_summary(latencies)}
        log.info("%d replicas: %s", n, out[f"replicas_{n}"])
    base = out[f"replicas_{counts[0]}"]["queries_per_s"]
    out["speedup"] = {str(n): round(out[f"replicas_{n}"]["queries_per_s"] / base, 3) for n in counts}
    return out


def edit_throughput(system: System, store: RedisStore, counts=(1, 2), facts: int = 300) -> dict[str, Any]:
    system.scale("replica", 1)
    pool = demo_facts(store.last_seq() + facts * len(counts))[store.last_seq() :]
    out: dict[str, Any] = {"facts": facts}
    for i, n in enumerate(counts):
        system.scale("editor", n)
        ray.get([system.handle(name).ping.remote() for name in system.names("editor")])
        batch = pool[i * facts : (i + 1) * facts]
        target = store.last_seq() + facts
        started = time.time()
        feed(store, batch, 0, progress=False)
        _wait_replicas(system, 1, target)
        elapsed = time.time() - started
        out[f"editors_{n}"] = {"seconds": round(elapsed, 2), "facts_per_s": round(facts / elapsed, 1)}
        log.info("%d editors: %s", n, out[f"editors_{n}"])
    base = out[f"editors_{counts[0]}"]["facts_per_s"]
    out["speedup"] = {str(n): round(out[f"editors_{n}"]["facts_per_s"] / base, 3) for n in counts}
    return out
