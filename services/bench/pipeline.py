"""Pipeline benchmarks: edit latency at a steady rate, sustained ingest, query latency under load.

1. latency: facts at `rate`/s into a running system; per fact, XADD -> applied on all replicas.
2. sustained: `sustained` facts as fast as the producer can send; throughput from first XADD to
   the last fact applied on every replica, ingest lag sampled every 0.5 s, facts lost.
3. query: a replica's single-prompt latency while the stream runs vs idle, interleaved.
5. editors: edit throughput of `facts` facts with 1 and with 2 editor workers (method given, e.g.
   scen, whose edits are expensive): seconds from the first XADD until a replica applied them all.
   Three set-ups: one editor with one thread, one editor with all the node's cores, two editors
   sharing the cores (one thread each on 2 cores): the speedups of adding a worker of the same size
   and of splitting the same cores between two workers.
4. evaluator: single-prompt latency on a replica the evaluator probes (at its default budget) vs
   on a second replica it leaves alone, queried alternately in one run, after `n` edits.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from editstream.demo_facts import demo_facts
from services.transport.store import RedisStore, connect
from services.wiring.clients import EvaluatorClient, ReplicaClient
from services.wiring.demo import edit_log, feed, percentile
from services.wiring.system import System, SystemConfig


def _system(
    redis_url: str,
    run_dir: str,
    method: str,
    model: str,
    replicas: int,
    options: dict[str, Any],
    evaluators: int = 0,
    editors: int = 1,
    editor_threads: int = 0,
):
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    config = SystemConfig(
        redis_url=redis_url,
        run_dir=run_dir,
        method=method,
        model=model,
        namespace=namespace,
        replicas=replicas,
        evaluators=evaluators,
        editors=editors,
        editor_threads=editor_threads,
        method_options=options,
    )
    return System(config).start(), RedisStore(connect(redis_url), namespace)


def latency_run(
    redis_url: str, run_dir: str, method: str, model: str, options: dict[str, Any], n: int, rate: float
) -> dict[str, Any]:
    system, store = _system(redis_url, run_dir + "/latency", method, model, 2, options)
    try:
        system.ask(["warm up"])
        feed(store, demo_facts(n), rate, progress=False)
        system.wait_for_version(n, timeout_s=600)
        lat = edit_log(system, store, Path(run_dir + "/latency"))
        return {
            "facts": n,
            "rate": rate,
            "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99),
            "mean_ms": round(statistics.fmean(lat), 1),
            "applied_all": len(lat),
        }
    finally:
        system.stop()


def sustained_run(
    redis_url: str, run_dir: str, method: str, model: str, options: dict[str, Any], n: int
) -> dict[str, Any]:
    system, store = _system(redis_url, run_dir + "/sustained", method, model, 2, options)
    try:
        system.ask(["warm up"])
        facts = demo_facts(n)
        lags: list[int] = []
        reached: dict[str, float] = {}  # when each stage had handled all n facts (s after the first XADD)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                lags.append(store.ingest_lag() or 0)
                stages = {"journaled": store.last_seq(), "computed": store.r.hlen(store.keys.artifacts)}
                for stage, count in stages.items():
                    if count >= n and stage not in reached:
                        reached[stage] = round(time.time() - started, 2)

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.time()
        sampler.start()
        feed_s = feed(store, facts, 0, progress=False)
        ok = system.wait_for_version(n, timeout_s=900)
        elapsed = time.time() - started
        done.set()
        reached["applied_all"] = round(elapsed, 2)
        editor = system.stats("editor-0")
        states = system.replica_states()
        journal_ids = {e.payload["edit_id"] for e in store.journal_after(0, count=10**7)}
        lost = len({f.edit_id for f in facts} - journal_ids)
        return {
            "facts": n,
            "converged": ok,
            "seconds": round(elapsed, 2),
            "feed_seconds": round(feed_s, 2),
            "facts_per_s": round(n / elapsed, 1),
            "lost": lost,
            "max_ingest_lag": max(lags, default=0),
            "profile": {  # where the time goes
                "stage_done_s": reached,
                "editor_compute_s": editor["compute_s"],
                "replica_apply_busy_s": [s["apply_busy_s"] for s in states],
            },
            "ingest_lag_samples": lags[:: max(1, len(lags) // 20)],
        }
    finally:
        system.stop()


def _timer(handle) -> Any:
    """A function timing one single-prompt query (8 new tokens) on replica `handle`, in seconds."""

    def one(p: str) -> float:
        t = time.perf_counter()
        ray.get(ReplicaClient(handle).ask([p], 8))
        return time.perf_counter() - t

    return one


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 1),
        "n": len(ordered),
    }


def evaluator_run(
    redis_url: str, run_dir: str, method: str, model: str, options: dict[str, Any], n: int, seconds: float = 120.0
) -> dict[str, Any]:
    """Two replicas with the same `n` edits; the evaluator probes only the first. Single-prompt
    queries alternate between them for `seconds`, so both sides see the same time and machine load."""
    system, store = _system(redis_url, run_dir + "/evaluator", method, model, 2, options, evaluators=1)
    try:
        feed(store, demo_facts(n), 0, progress=False)
        system.wait_for_version(n, timeout_s=600)
        probed, spared = system.replica_handles()
        evaluator = system.handle("evaluator-0")
        ray.get(EvaluatorClient(evaluator).set_replicas([probed]))
        timers = {"on": _timer(probed), "off": _timer(spared)}
        prompts = [f.prompt for f in demo_facts(20)]
        for one in timers.values():
            one(prompts[0])
        samples: dict[str, list[float]] = {"on": [], "off": []}
        rounds_before = ray.get(EvaluatorClient(evaluator).stats())["rounds"]
        end = time.time() + seconds
        i = 0
        while time.time() < end:
            for side, one in timers.items():
                samples[side].append(one(prompts[i % len(prompts)]))
            i += 1
        rounds = ray.get(EvaluatorClient(evaluator).stats())["rounds"] - rounds_before
        s_on, s_off = _summary(samples["on"]), _summary(samples["off"])
        return {
            "edits": n,
            "eval_budget": system.config.eval_budget,
            "seconds": seconds,
            "evaluator_rounds": rounds,
            "on": s_on,
            "off": s_off,
            "ratio_median": round(s_on["median_ms"] / s_off["median_ms"], 3),
            "ratio_mean": round(s_on["mean_ms"] / s_off["mean_ms"], 3),
        }
    finally:
        system.stop()


def query_run(
    redis_url: str, run_dir: str, method: str, model: str, options: dict[str, Any], n: int, rounds: int = 20
) -> dict[str, Any]:
    system, store = _system(redis_url, run_dir + "/query", method, model, 2, options)
    try:
        prompts = [f.prompt for f in demo_facts(10)]
        one = _timer(system.replica_handles()[0])
        one(prompts[0])
        idle = [one(p) for _ in range(rounds // 10 or 1) for p in prompts]
        feeder = threading.Thread(target=feed, args=(store, demo_facts(n), 50.0, False), daemon=True)
        feeder.start()
        busy = []
        while feeder.is_alive() and len(busy) < rounds * 10:
            busy.append(one(prompts[len(busy) % len(prompts)]))
        feeder.join()
        idle += [one(p) for _ in range(rounds // 10 or 1) for p in prompts]
        i_med, b_med = statistics.median(idle), statistics.median(busy)
        return {
            "idle_median_ms": round(1000 * i_med, 1),
            "streaming_median_ms": round(1000 * b_med, 1),
            "ratio": round(b_med / i_med, 3),
            "idle_n": len(idle),
            "streaming_n": len(busy),
            "rate": 50.0,
        }
    finally:
        system.stop()


def editors_run(
    redis_url: str, run_dir: str, method: str, model: str, options: dict[str, Any], n: int
) -> dict[str, Any]:
    """Throughput of one editor on one thread, one editor on the node's cores, two editors sharing them."""
    out: dict[str, Any] = {"facts": n}
    rates = []
    for editors, threads in ((1, 1), (1, 0), (2, 0)):  # threads 0: the cores shared among the editors
        key = f"editors_{editors}_threads_{threads or 'shared'}"
        system, store = _system(
            redis_url, f"{run_dir}/{key}", method, model, 1, options, editors=editors, editor_threads=threads
        )
        try:
            started = time.time()
            feed(store, demo_facts(n), 0, progress=False)
            ok = system.wait_for_version(n, timeout_s=1800)
            elapsed = time.time() - started
            out[key] = {"converged": ok, "seconds": round(elapsed, 1), "facts_per_s": round(n / elapsed, 3)}
            rates.append(n / elapsed)
        finally:
            system.stop()
    one_thread, all_cores, two = rates
    out["speedup_vs_one_single_thread_editor"] = round(two / one_thread, 3)
    out["speedup_vs_one_editor_on_all_cores"] = round(two / all_cores, 3)
    return out
