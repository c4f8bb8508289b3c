"""Snapshot and compaction benchmark: what Redis keeps per live edit before and after compaction,
what a snapshot costs to write and load, and how long a restarted replica takes to be ready.

On a private redis-server, with the real model and a real method: `facts` synthetic facts (a share
superseded by a newer fact of the same prompt, a share retracted) are journaled and computed by an
editor; replica-0 replays them all and writes a snapshot; Redis memory of the namespace's keys
(`MEMORY USAGE`, every element counted; a stream frees a node only once all its entries are gone,
so a short journal's bytes barely move) is taken before and after compacting below it; then `tail`
more facts arrive and a second replica starts from the snapshot. Its time to ready (model load,
snapshot load, tail replay) and its digest against replica-0's are recorded. Last, replica-0's
state after the tail is written as a snapshot twice, whole into an empty store and incrementally
beside its earlier snapshot, timed, with the bytes each wrote.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from editstream.edits import EditRequest
from editstream.events import edit_to_payload
from editstream.snapshot import write_snapshot
from services.transport.redis_server import RedisServer
from services.transport.store import RedisStore, connect
from services.workers.editor import Editor
from services.workers.ingest import content_hash
from services.workers.replica_host import ReplicaService

log = logging.getLogger(__name__)

NAMESPACE = "snapbench"
CITIES = ("Lyon", "Oslo", "Lima", "Kyoto", "Perth", "Quito", "Tunis", "Riga", "Dakar", "Hanoi")


def synthetic_facts(n: int, seed: int = 0) -> list[EditRequest]:
    """`n` distinct facts of one template ("<name> lives in the city of" -> a city)."""
    rng = random.Random(seed)
    return [
        EditRequest(
            f"Person {i:07d} lives in the city of", rng.choice(CITIES), edit_id=f"f-{i}", subject=f"Person {i:07d}"
        )
        for i in range(n)
    ]


def _journal(store: RedisStore, ops: list[tuple[str, Any]]) -> None:
    for op, item in tqdm(ops, desc="journal", unit="entry", leave=False):
        if op == "edit":
            payload = edit_to_payload(item)
            store.journal_append(item.edit_id, content_hash(payload), payload, time.time() * 1000)
        else:
            edit_id, retract_id = item
            payload = {"op": "retract", "edit_id": retract_id, "retracts": edit_id}
            store.journal_append(retract_id, content_hash(payload), payload, time.time() * 1000, retracts=edit_id)


def plan(facts: list[EditRequest], supersede: float, retract: float, seed: int = 0) -> tuple[list, int]:
    """Journal operations: every fact, then for a `supersede` share a newer fact of the same prompt,
    and for a `retract` share of the rest a retract; and the number of live edits afterwards."""
    rng = random.Random(seed)
    ops: list[tuple[str, Any]] = [("edit", f) for f in facts]
    shuffled = rng.sample(facts, len(facts))
    n_sup, n_ret = int(len(facts) * supersede), int(len(facts) * retract)
    for f in shuffled[:n_sup]:
        ops.append(("edit", EditRequest(f.prompt, rng.choice(CITIES), edit_id=f"{f.edit_id}-v2", subject=f.subject)))
    for f in shuffled[n_sup : n_sup + n_ret]:
        ops.append(("retract", (f.edit_id, f"r-{f.edit_id}")))
    live = len(facts) - n_ret  # a superseded edit's newer fact replaces it: one live edit per prompt
    return ops, live


def _drain(service: Any) -> float:
    started = time.perf_counter()
    while service.step():
        pass
    if hasattr(service, "wait_snapshot"):
        service.wait_snapshot()
    return time.perf_counter() - started


def run(
    facts: int, tail: int, method: str, model: str, supersede: float = 0.1, retract: float = 0.05
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="editstream-snapbench-"))
    try:
        with RedisServer(directory=work / "redis") as server:
            return _run(server.url, work / "snaps", facts, tail, method, model, supersede, retract)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    url: str, snaps: Path, facts: int, tail: int, method: str, model: str, supersede: float, retract: float
) -> dict[str, Any]:
    store = RedisStore(connect(url), NAMESPACE)
    every = synthetic_facts(facts + tail)
    ops, live = plan(every[:facts], supersede, retract)
    _journal(store, ops)
    editor = Editor(url, method, model, NAMESPACE)
    compute_s = _drain(editor)
    opts = {"snapshot_dir": str(snaps), "snapshot_every": len(ops)}
    writer = ReplicaService(url, method, model, "replica-0", NAMESPACE, **opts)
    replay_s = _drain(writer)
    snapshot = writer.snapshot_seq
    if snapshot != len(ops):
        raise RuntimeError(f"replica-0 wrote its snapshot at seq {snapshot}, expected {len(ops)}")
    before = store.memory_by_key()
    started = time.perf_counter()
    writer.compact_below(snapshot)
    compact_s = time.perf_counter() - started
    after = store.memory_by_key()
    journal_after = int(store.r.xlen(store.keys.journal))
    snap_dir = max((snaps / NAMESPACE).glob("snap-*"))
    snapshot_bytes = sum(p.stat().st_size for p in snap_dir.iterdir())
    _journal(store, [("edit", f) for f in every[facts:]])
    _drain(editor)
    started = time.perf_counter()
    late = ReplicaService(url, method, model, "replica-1", NAMESPACE, snapshot_dir=str(snaps))
    while not late.ready:
        late.step()
    ready_s = time.perf_counter() - started
    _drain(late)
    _drain(writer)
    writes = _time_writes(writer, snaps)
    return {
        "method": method,
        "facts": facts,
        "journal_entries": len(ops),
        "live_edits": live,
        "superseded": int(facts * supersede),
        "retracted": int(facts * retract),
        "tail": tail,
        "editor_compute_s": round(compute_s, 1),
        "replay_all_s": round(replay_s, 1),
        "redis_bytes_before_compaction": before,
        "redis_bytes_after_compaction": after,
        "redis_bytes_per_live_edit_before": round(sum(before.values()) / live, 1),
        "redis_bytes_per_live_edit_after": round(sum(after.values()) / live, 1),
        "journal_length_after_compaction": journal_after,
        "compaction_s": round(compact_s, 2),
        "snapshot_bytes": snapshot_bytes,
        "snapshot_bytes_per_live_edit": round(snapshot_bytes / live, 1),
        "restart_ready_s": round(ready_s, 1),
        "restart_loaded_snapshot_seq": late.snapshot_seq,
        "restart_replayed_tail": late.version - late.snapshot_seq,
        "digests_agree": late.replica.digest() == writer.replica.digest() and late.version == writer.version,
        **writes,
    }


def _time_writes(writer: ReplicaService, snaps: Path) -> dict[str, Any]:
    """A snapshot of the writer's state after the tail, written whole into an empty store and
    incrementally beside the earlier snapshot (the tail's artifacts only, the rest linked)."""
    state = writer.capture()
    out = {}
    for how, store in (("whole", snaps / "whole"), ("incremental", snaps / NAMESPACE)):
        started = time.perf_counter()
        path = write_snapshot(state, store)
        out[f"snapshot_write_{how}_s"] = round(time.perf_counter() - started, 2)
        own = path / f"pack-{state.seq:012d}.bin"
        out[f"snapshot_write_{how}_bytes"] = own.stat().st_size
    return out
