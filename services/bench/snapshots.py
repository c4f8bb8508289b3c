"""Snapshot and compaction benchmark: what Redis keeps per live edit before and after compaction,
what a snapshot costs to write and load, and how long a restarted replica takes to be ready.

On a private redis-server, with the real model and a real method: `facts` synthetic facts (a share
superseded by a newer fact of the same prompt, a share retracted) are journaled and computed by an
editor; replica-0 replays them all and writes a snapshot; Redis memory of the namespace's keys
(`MEMORY USAGE`, every element counted; a stream frees a node only once all its entries are gone,
so a short journal's bytes barely move) is taken before and after compacting below it; then `tail`
more facts arrive and a second replica starts from the snapshot in a process of its own, as a
restarted replica does. Its time to ready (process start, model load, snapshot load, tail replay),
its resident memory before and after the snapshot load, and its digest against replica-0's are
recorded. Then `probes` more facts go through the whole path one after another (XADD to the facts
stream, ingest, editor, both replicas) and the time from XADD until both replicas have applied each
is recorded: edit latency with every earlier edit stored. Ingest, editor and replica-0 are stepped
in this process, so their work for one fact runs back to back, never overlapped; the restarted
replica follows on its own. Last, replica-0's state is written as a snapshot twice, whole into an
empty store and incrementally beside its earlier snapshot, timed, with the bytes each wrote.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from editstream.bench.cost import rss_bytes
from editstream.edits import EditRequest
from editstream.events import edit_to_payload, event_fields
from editstream.snapshot import write_snapshot
from services.transport.redis_server import RedisServer
from services.transport.store import RedisStore, connect
from services.workers.editor import Editor
from services.workers.ingest import Ingestor, content_hash
from services.workers.replica_host import ReplicaService, trim_heap

log = logging.getLogger(__name__)

NAMESPACE = "snapbench"
RESTART_TIMEOUT_S = 1800.0  # a restarted replica that is not ready by then fails the run
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
    facts: int,
    tail: int,
    method: str,
    model: str,
    probes: int = 500,
    supersede: float = 0.1,
    retract: float = 0.05,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="editstream-snapbench-"))
    try:
        with RedisServer(directory=work / "redis") as server:
            return _run(server.url, work / "snaps", facts, tail, probes, method, model, supersede, retract)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    url: str,
    snaps: Path,
    facts: int,
    tail: int,
    probes: int,
    method: str,
    model: str,
    supersede: float,
    retract: float,
) -> dict[str, Any]:
    store = RedisStore(connect(url), NAMESPACE)
    every = synthetic_facts(facts + tail + probes)
    ops, live = plan(every[:facts], supersede, retract)
    _journal(store, ops)
    editor = Editor(url, method, model, NAMESPACE)
    compute_s = _drain(editor)
    opts = {"snapshot_dir": str(snaps), "snapshot_every": len(ops)}
    writer = ReplicaService(url, method, model, "replica-0", NAMESPACE, **opts)
    writer_rss = rss_bytes()
    replay_s = _drain(writer)
    writer_growth = rss_bytes() - writer_rss
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
    _journal(store, [("edit", f) for f in every[facts : facts + tail]])
    _drain(editor)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as a restarted replica has
    conn, child_conn = ctx.Pipe()
    started = time.perf_counter()
    late = ctx.Process(target=_restarted, args=(url, method, model, str(snaps), child_conn), daemon=True)
    late.start()
    try:
        restart = _receive(conn, late)
        restart["restart_process_ready_s"] = round(time.perf_counter() - started, 1)
        _drain(writer)
        latency, theirs = _edit_latency(store, url, editor, writer, conn, late, every[facts + tail :])
    finally:
        late.join(timeout=30)
        if late.is_alive():
            late.kill()
    writes = _time_writes(writer, snaps)
    live_now = live + tail + probes
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
        **restart,
        "restart_rss_per_live_edit_bytes": round(
            (restart["restart_rss_ready_bytes"] - restart["restart_rss_model_bytes"]) / (live + tail), 1
        ),
        "writer_rss_growth_per_live_edit_bytes": round(writer_growth / live, 1),
        **latency,
        "live_edits_at_end": live_now,
        "digests_agree": theirs["digest"] == writer.replica.digest() and theirs["version"] == writer.version,
        **writes,
    }


def _restarted(url: str, method: str, model: str, snaps: str, conn: Any) -> None:
    """A replica restarting in a process of its own: it loads the newest snapshot, replays the tail,
    reports its time to ready and resident memory, then follows the journal until told where to stop."""
    logging.basicConfig(level=logging.INFO, format="restarted replica %(asctime)s %(name)s: %(message)s")
    pid = os.getpid()
    started = time.perf_counter()
    service = ReplicaService(url, method, model, "replica-1", NAMESPACE, snapshot_dir=snaps)
    constructed = time.perf_counter() - started
    trim_heap()  # as after the snapshot load: both readings without freed pages
    rss_model = rss_bytes(pid)
    while not service.ready:
        service.step()
    conn.send(
        {
            "restart_ready_s": round(time.perf_counter() - started, 1),
            "restart_constructor_s": round(constructed, 1),  # model, method, warm-up
            "restart_snapshot_load_s": round(service.snapshot_load_s or 0.0, 1),
            "restart_rss_model_bytes": rss_model,
            "restart_rss_ready_bytes": rss_bytes(pid),
            "restart_loaded_snapshot_seq": service.snapshot_seq,
            "restart_replayed_tail": service.version - service.snapshot_seq,
        }
    )
    while not conn.poll():
        service.step()
    want = conn.recv()
    while service.version < want["version"]:
        service.step()
    conn.send(
        {
            "applied": service.applied_times(want["seqs"]),
            "digest": service.replica.digest(),
            "version": service.version,
            "rss_bytes": rss_bytes(pid),
        }
    )


def _receive(conn: Any, child: Any, timeout_s: float = RESTART_TIMEOUT_S) -> dict:
    """The restarted replica's next message; an error naming its exit code if it died first."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(1.0):
        if not child.is_alive():
            raise RuntimeError(f"the restarted replica's process exited with code {child.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the restarted replica sent nothing in {timeout_s:.0f} s")
    return conn.recv()


def _edit_latency(
    store: RedisStore, url: str, editor: Editor, writer: ReplicaService, conn: Any, child: Any, facts: list
) -> tuple[dict[str, Any], dict]:
    """XADD -> applied on both replicas for each of `facts`, sent one after another (the next once
    replica-0 has applied the last); the restarted replica's apply times come from its process."""
    ingestor = Ingestor(url, NAMESPACE)
    seqs = []
    for fact in tqdm(facts, desc="edit latency", unit="fact", leave=False):
        store.r.xadd(store.keys.facts, event_fields(fact))
        while ingestor.step() == 0:
            pass
        seq = store.last_seq()
        while editor.step() == 0:
            pass
        while writer.version < seq:
            writer.step()
        seqs.append(seq)
    if not seqs:
        conn.send({"version": writer.version, "seqs": []})
        return {}, _receive(conn, child)
    conn.send({"version": seqs[-1], "seqs": seqs})
    theirs = _receive(conn, child)
    at = {e.seq: e.at_ms for e in store.journal_after(seqs[0] - 1, count=len(seqs))}
    ms = sorted(max(writer.applied_at[s], theirs["applied"][s]) - at[s] for s in seqs)
    return {
        "edit_latency_facts": len(ms),
        "edit_latency_p50_ms": round(statistics.median(ms), 1),
        "edit_latency_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "edit_latency_max_ms": round(ms[-1], 1),
        "restart_rss_end_bytes": theirs["rss_bytes"],
    }, theirs


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
