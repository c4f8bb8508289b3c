"""Helpers for pipeline tests: feeding with retries, killing actors, checking exactly-once."""

from __future__ import annotations

import os
import signal
import threading
import time

import ray
import redis

from editstream.edits import EditRequest
from editstream.events import event_fields
from services.transport.store import RedisStore
from services.wiring.system import System


def feed_in_thread(store: RedisStore, facts: list[EditRequest], rate: float = 0.0) -> threading.Thread:
    """XADD every fact, retrying while Redis is down; runs in a thread."""

    def run() -> None:
        started = time.time()
        for i, f in enumerate(facts):
            if rate:
                time.sleep(max(0.0, started + i / rate - time.time()))
            while True:
                try:
                    store.r.xadd(store.keys.facts, event_fields(f))
                    break
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_journal(store: RedisStore, at_least: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if store.last_seq() >= at_least:
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"journal did not reach {at_least} entries")


def kill9(system: System, name: str) -> None:
    pid = ray.get(system.handle(name).pid.remote())
    os.kill(pid, signal.SIGKILL)


def wait_converged(system: System, store: RedisStore, expected: int, timeout_s: float = 300) -> list[dict]:
    deadline = time.time() + timeout_s
    states: list[dict] = []
    while time.time() < deadline:
        try:
            if store.last_seq() >= expected:
                states = system.replica_states()
                if len({(s["version"], s["digest"]) for s in states}) == 1 and states[0]["version"] == store.last_seq():
                    return states
        except (redis.RedisError, ray.exceptions.RayActorError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"replicas did not converge on {expected}: {states}, journal at {store.last_seq()}")


def assert_exactly_once(store: RedisStore, facts: list[EditRequest]) -> None:
    """Journal seqs 1..n gap-free and unique; every fact's edit_id journaled exactly once."""
    journal = store.journal_after(0, count=10**7)
    seqs = [e.seq for e in journal]
    assert seqs == list(range(1, len(seqs) + 1)), "journal seqs are not unique and gap-free"
    ids = [e.payload["edit_id"] for e in journal if e.payload["op"] == "edit"]
    assert len(ids) == len(set(ids)), "an edit_id was journaled twice"
    missing = {f.edit_id for f in facts} - set(ids)
    assert not missing, f"{len(missing)} accepted facts were lost, e.g. {sorted(missing)[:3]}"
