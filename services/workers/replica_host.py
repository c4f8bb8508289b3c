"""Replica service: one model copy that follows the journal and answers queries.

It applies journal entries strictly in seq order, waiting for an edit's artifact when the editor
has not stored it yet. A new or restarted replica starts from the newest snapshot the journal
still agrees with (when a snapshot store is set; else at version 0) and replays the journal after
it with stored artifacts: no recomputation. Queries may carry `min_version` (read-your-writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch

from editstream.arrowlog import EDIT_SCHEMA, ArrowLog, read_log
from editstream.artifacts import Artifact
from editstream.errors import ArtifactError, NotReadyError, OrderError
from editstream.generation import Sampling
from editstream.methods import create_method
from editstream.models import cache_dir, load_causal_lm
from editstream.replica import Replica, state_digest
from editstream.snapshot import Capture, SnapshotWriter, capture, load_snapshot, snapshots
from editstream.snapshot_s3 import S3Snapshots, is_s3
from services.transport.store import RedisStore, connect
from services.wiring.cluster import node_name
from services.workers.prometheus import Metrics

log = logging.getLogger(__name__)

APPLIED_TIMES_KEPT = 100_000  # apply times kept per replica for latency measurements (memory stays flat)
# A heartbeat's digest is recomputed (it hashes every applied edit: ~0.2 s at a million) at most once
# per max(DIGEST_MIN_S, DIGEST_DUTY x its last cost), on a thread beside the apply loop (the heartbeat
# after it carries it); `state()` asked from outside (status checks, tests, benchmarks) hashes fresh.
DIGEST_DUTY = 20
DIGEST_MIN_S = 1.0
SWITCH_INTERVAL_S = 0.0005  # the snapshot writer's interpreter-lock switch interval (below)
SNAPSHOT_WRITER = "replica-0"  # the one replica that writes snapshots (they are the same on every replica)
FREEZE_EVERY = 10_000  # entries applied between `freeze_heap` (and `trim_heap`) calls


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`; elsewhere nothing): loading
    or writing a snapshot of a million edits frees hundreds of MB of buffers that would otherwise stay
    resident in this process (measured: ~0.2 KB per live edit after a load)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def freeze_heap() -> None:
    """Collect the young generations, then move every object alive into the permanent one, which
    collections never scan. A replica's applied edits live on (a superseded or retracted edit is
    freed by its reference count, frozen or not), and without this each full collection walks all
    of them: measured 0.51 s at 368k RECIPE edits, growing with them, on both replicas at once."""
    gc.collect(1)
    gc.freeze()


class ReplicaService:
    """Follows the journal and serves; calls from several threads are serialised by a lock."""

    def __init__(
        self,
        redis_url: str,
        method: str,
        model: str,
        name: str = "replica-0",
        namespace: str = "editstream",
        threads: int = 1,
        method_options: dict | None = None,
        run_dir: str | None = None,
        max_tries: int = 3,
        edit_scope: str = "answer",
        snapshot_dir: str | None = None,
        snapshot_every: int = 0,
        compact: bool = False,
        snapshot_cache: str | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.name, self.method = name, method
        self.max_tries = max_tries  # apply attempts per entry before it is dead-lettered
        self._failures: dict[int, int] = {}
        self._last_entry: tuple[int, str, float] | None = None  # (seq, edit id, at) of the last entry taken
        self._checked = 0.0
        self._state: dict = {"name": name, "version": 0, "digest": "", "edits": 0, "ready": False}
        self._digest_cache: tuple[int, str, float, float] = (-1, "", 0.0, 0.0)  # version, digest, when, cost
        self._resets = 0  # times the state went back to version 0 (a hash taken before is not kept)
        self.store = RedisStore(connect(redis_url), namespace)
        self.replica = Replica(create_method(method, load_causal_lm(model), **(method_options or {})))
        self.replica.set_edit_scope(edit_scope)
        # _lock guards the edit state and version (applies, plan building, state reads); _model_lock
        # serialises whatever runs the model (its forward hooks are per model, not per call). A
        # method whose decoding reads no edit state lets applies go on while a query decodes.
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._advanced = threading.Condition(self._lock)
        self._announce_id = "0-0"
        # seq -> wall time (ms) when it took effect here; the newest APPLIED_TIMES_KEPT only (diagnostic)
        self.applied_at: dict[int, float] = {}
        self.busy_s = 0.0  # seconds spent fetching and applying journal entries
        self._unfrozen = 0  # entries applied since the last `freeze_heap`
        self._writer: threading.Thread | None = None  # the snapshot being written, if any
        self._hasher: threading.Thread | None = None  # a heartbeat's digest being hashed, if any
        self._beat = 0.0
        self.metrics = Metrics(name)
        self.replica.generate(["warm-up"], max_new_tokens=1)  # the first forward is slow
        self.node = node_name()
        # The journal as it stood when this replica started, read on the first step: a constructor
        # never needs Redis, so a replica restarted during an outage comes up and waits in its loop.
        self.catch_up_to: int | None = None
        self.ready = False
        # Snapshots (one directory per namespace): a starting replica loads the newest one the journal
        # still agrees with and replays only the tail; SNAPSHOT_WRITER takes one every
        # `snapshot_every` entries (0: never).
        # With a bucket as the store (s3://bucket/prefix), this replica reads and writes its own local
        # copy (`snapshot_cache`, else the cache directory) and the bucket is mirrored to and from it.
        self.mirror = S3Snapshots(f"{snapshot_dir.rstrip('/')}/{namespace}") if is_s3(snapshot_dir) else None
        if self.mirror is not None:
            self.snapshot_dir = Path(snapshot_cache or cache_dir() / "snapshots") / namespace / name
        else:
            self.snapshot_dir = Path(snapshot_dir) / namespace if snapshot_dir else None
        self.snapshot_every = snapshot_every if name == SNAPSHOT_WRITER else 0
        if self.snapshot_every:
            # The snapshot thread walks every live edit in Python; each time the apply loop comes
            # back from Redis or a lock it waits for the interpreter lock up to the switch interval
            # (5 ms by default), several times per entry, so a long write starved the applies (a
            # million-edit soak: p99 9.5 s on this replica, 2.3 s on the other). Switch sooner.
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        # the writer keeps where its last snapshot put each edit, so the next walks only the new ones
        self._snapshots = SnapshotWriter(self.snapshot_dir) if self.snapshot_every and self.snapshot_dir else None
        self.snapshot_seq = 0  # the seq of the snapshot this replica loaded or last wrote
        self.snapshot_load_s: float | None = None  # how long loading it took (None: none loaded)
        # After writing a snapshot the writer compacts Redis below it (`compact`): below the snapshot,
        # every live replica's version and the editors' progress, so no running reader loses an entry.
        self.compact = compact and bool(self.snapshot_every)
        self.edit_log: ArrowLog | None = None
        self._logged_up_to = 0  # after a restart, the replayed entries were logged by the earlier run
        if run_dir:  # one file series per namespace and replica: a restart continues its own series
            writer = f"{namespace}.{name}"
            earlier = read_log(Path(run_dir), "edits", writer=writer)
            self._logged_up_to = (pc.max(earlier["seq"]).as_py() or 0) if earlier.num_rows else 0
            self.edit_log = ArrowLog(Path(run_dir), "edits", EDIT_SCHEMA, writer=writer)

    @property
    def version(self) -> int:
        return self.replica.version

    def step(self) -> int:
        """Apply what is ready after the current version; returns how many entries were applied."""
        if self.catch_up_to is None:
            self.catch_up_to = self.store.last_seq()
            self._restore()
        if time.time() - self._checked > 1.0:
            self._checked = time.time()
            self._check_journal()
        started = time.perf_counter()
        entries = self.store.journal_after(self.replica.version, count=256)
        if entries and entries[0].seq > self.replica.version + 1:
            self._catch_up_compacted(entries[0].seq)
            return 0
        blobs = self.store.get_artifacts(
            self.replica.method.name, [e.seq for e in entries if e.payload["op"] == "edit"]
        )
        done, events, waiting = 0, [], False
        try:
            for entry in entries:
                payload = entry.payload
                if payload["op"] == "edit" and blobs.get(entry.seq) is None:
                    if self.store.dead([entry.seq])[entry.seq] is None:
                        waiting = True
                        break  # not computed yet: wait for the editor's announcement
                    applied = self._take(entry, None, dead=True)  # dead-lettered: skipped here as everywhere
                else:
                    artifact = Artifact.from_bytes(blobs[entry.seq]) if payload["op"] == "edit" else None
                    if artifact is not None and artifact.edit_id != payload["edit_id"]:
                        raise OrderError(
                            f"the artifact stored for seq {entry.seq} is for edit {artifact.edit_id!r}, but the "
                            f"journal entry names {payload['edit_id']!r}: the journal and artifact store disagree"
                        )
                    applied = self._take(entry, artifact)
                now_ms = self.applied_at[entry.seq] = time.time() * 1000
                if len(self.applied_at) > APPLIED_TIMES_KEPT:
                    del self.applied_at[next(iter(self.applied_at))]
                done += 1
                self.metrics.applied.inc()
                self.metrics.latency.observe(now_ms - entry.at_ms)
                if entry.seq > self._logged_up_to:
                    blob = blobs.get(entry.seq) if payload["op"] == "edit" else None
                    events.append(self._event(entry, now_ms, len(blob) if blob else 0, "dead" if not applied else None))
        finally:  # entries applied before a mid-batch error (Redis going down) are logged all the same
            if events and self.edit_log is not None:
                self.edit_log.append(events)
        # Ready once replayed to the journal head as it stood at the start, or to the first entry no
        # editor has computed yet: no replica can be further along than that, so waiting for the
        # editors' backlog (SCEN computes slowly) would keep a restarted replica out for nothing.
        if not self.ready and (waiting or self.replica.version >= self.catch_up_to):
            with self._advanced:
                self.ready = True
                self._advanced.notify_all()
            log.info(
                "%s replayed to seq %d (journal head at start %d): ready for queries",
                self.name,
                self.replica.version,
                self.catch_up_to,
            )
        if done:
            self.busy_s += time.perf_counter() - started
            self._unfrozen += done
            if self._unfrozen >= FREEZE_EVERY:
                self._unfrozen = 0
                freeze_heap()
                trim_heap()  # every replica, not only the snapshot writer: 2,572 -> 2,165 B per edit at 120k, 13 ms
        if self.snapshot_every and self.ready and self.version - self.snapshot_seq >= self.snapshot_every:
            self._snapshot()  # also when idle: one due while the last was being written is taken now
        if not done:
            self._announce_id = self.store.wait_announce(self._announce_id, block_ms=50)
        if time.time() - self._beat > 1.0:
            self._beat = time.time()
            self.metrics.version.set(self.replica.version)
            self.metrics.lag.set(max(0, self.store.last_seq() - self.replica.version))
            self.store.heartbeat(self.name, {**self.state(fresh=False), "time": self._beat})
        return done

    def _restore(self) -> None:
        """Start from the newest snapshot whose journal entry is still in the journal (a snapshot
        past the head, or of a seq that now names another fact, is not used)."""
        if self.snapshot_dir is None or self.replica.version > 0:
            return
        if self.mirror is not None:
            try:
                self.mirror.pull(self.snapshot_dir)
            except Exception as exc:  # noqa: BLE001 - the bucket unreachable or refusing: use what is here
                log.warning(
                    "%s: no snapshots fetched from %s (%s); using those in %s",
                    self.name,
                    self.mirror.url,
                    exc,
                    self.snapshot_dir,
                )
        lm = self.replica.method.lm
        for info in snapshots(self.snapshot_dir, self.replica.method.name, lm.fingerprint):
            if info.entry is None or info.seq > self.catch_up_to or not self._journal_holds(info.seq, *info.entry):
                log.info("%s: snapshot at seq %d does not match the journal; not used", self.name, info.seq)
                continue
            started = time.perf_counter()
            try:
                with self._advanced:
                    load_snapshot(self.replica, info)
                    self._last_entry = (info.seq, info.entry[0], float(info.entry[1]))
            except (ArtifactError, OSError, ValueError) as exc:
                log.warning("%s: snapshot %s not loaded: %s", self.name, info.path, exc)
                continue
            self.snapshot_seq = info.seq
            trim_heap()  # the load's parse buffers are free now: give their pages back
            gc.freeze()  # the loaded edits live on: later collections need not scan a million objects
            self.snapshot_load_s = time.perf_counter() - started
            log.info(
                "%s: loaded the snapshot at seq %d (%d edits) in %.1f s; replaying the journal after it",
                self.name,
                info.seq,
                len(self.replica.method.edit_ids()),
                time.perf_counter() - started,
            )
            return

    def _catch_up_compacted(self, first: int) -> None:
        """The journal after this replica's version starts at `first`: the entries between were
        compacted away, so only a snapshot can bring it up (started from none, or fell behind)."""
        compacted = self.store.compacted()
        if self.replica.version >= compacted:
            raise OrderError(
                f"{self.name}: the journal jumps from seq {self.replica.version} to {first} but is compacted "
                f"only below {compacted}: the journal lost entries"
            )
        if self.snapshot_dir is not None:
            self._start_over()
            self._restore()
        if self.replica.version < compacted:
            where = f"no snapshot in {self.snapshot_dir} reaches it" if self.snapshot_dir else "no snapshot store set"
            raise NotReadyError(
                f"{self.name}: the journal is compacted below seq {compacted} and this replica is at "
                f"{self.replica.version}; {where}: it cannot catch up and takes no queries"
            )

    def _snapshot(self) -> None:
        """Capture the state now (under the lock: references to immutable artifacts) and write it, then
        with `compact` compact Redis below it, on a background thread: the apply loop goes on while a
        snapshot of every live edit is serialised. One write at a time; a snapshot that falls due
        meanwhile is taken at the first step after it."""
        if self._writer is not None and self._writer.is_alive():
            return
        if self._snapshots is None or self._last_entry is None or self._last_entry[0] != self.version:
            return  # nothing to tie a snapshot to: no capture of every live edit on each idle step
        state = self.capture()
        if state.entry is None:
            return
        self._writer = threading.Thread(target=self._write, args=(state,), name=f"{self.name}-snapshot", daemon=True)
        self._writer.start()

    def capture(self) -> Capture:
        """The replica's edit state now, tied to the journal entry at its version (None if unknown)."""
        with self._lock:
            entry = self._last_entry
            return capture(self.replica, (entry[1], entry[2]) if entry and entry[0] == self.version else None)

    def _write(self, state: Capture) -> None:
        try:
            path = self._snapshots.write(state)
            if self.mirror is not None:  # compacted below only once the bucket holds it
                self.mirror.push(path)
            self.snapshot_seq = state.seq
            trim_heap()
            if self.compact:
                self.compact_below(state.seq)
        except Exception:  # a thread's top level: the next due snapshot tries again
            log.exception("%s: the snapshot at seq %d was not written", self.name, state.seq)

    def wait_snapshot(self, timeout_s: float | None = None) -> None:
        """Wait for the snapshot being written (if any) to be written and compacted below."""
        if self._writer is not None:
            self._writer.join(timeout_s)

    def compact_below(self, snapshot_seq: int) -> None:
        """Compact below the snapshot, but not past a live replica that is still behind it (it would
        have to reload a snapshot) nor past an entry no editor has computed or dead-lettered."""
        now = time.time()
        versions = [
            int(b.get("version", 0))
            for n, b in self.store.replica_heartbeats().items()
            if n != self.name and now - float(b.get("time", 0)) <= 10.0
        ]
        below = min([snapshot_seq, *versions])
        if below > self.store.compacted():
            removed = self.store.compact(self.replica.method.name, below)
            log.info("%s: compacted Redis below seq %d (snapshot at %d): %s", self.name, below, snapshot_seq, removed)

    def _journal_holds(self, seq: int, edit_id: str, at_ms: float) -> bool:
        """Is journal entry `seq` the fact (edit id, time) this replica applied or snapshotted?"""
        found = self.store.journal_get([seq]) if seq > 0 else []
        return bool(found) and (found[0].payload["edit_id"], float(found[0].at_ms)) == (edit_id, float(at_ms))

    def _check_journal(self) -> None:
        """Is the journal entry at this replica's version still the one it applied? If Redis lost its
        last writes (AOF everysec, a failover) the seqs may have been handed to other facts: then
        this replica rebuilds from the journal as it is, so a divergence is repaired, never silent."""
        if self._last_entry is None:
            return
        seq, edit_id, at_ms = self._last_entry
        if self._journal_holds(seq, edit_id, at_ms):
            return
        found = self.store.journal_get([seq])
        now = found[0].payload["edit_id"] if found else "nothing"
        log.error(
            "%s: journal seq %d is now %s, not %s as applied: rebuilding from seq 0", self.name, seq, now, edit_id
        )
        self._start_over()

    def _start_over(self) -> None:
        """Back to the unedited model at version 0, not ready, to catch up with the journal as it is now."""
        self.wait_snapshot()  # a write in flight would set snapshot_seq after the reset
        with self._advanced:
            self.replica.method.reset()
            self.replica.version, self._last_entry, self.snapshot_seq = 0, None, 0
            self.ready, self.catch_up_to = False, self.store.last_seq()
            self._digest_cache = (-1, "", 0.0, 0.0)  # the same version may now be another state
            self._resets += 1

    def _take(self, entry, artifact: Artifact | None, dead: bool = False) -> bool:
        """Apply one journal entry (an edit's artifact, a retract), or skip a dead-lettered one; an
        entry whose apply fails `max_tries` times is dead-lettered and skipped. True if applied."""
        with self._advanced:
            try:
                if dead:
                    self.replica.skip(entry.seq)
                elif artifact is not None:
                    self.replica.apply(entry.seq, artifact)
                else:
                    self.replica.retract(entry.seq, entry.payload["retracts"])
            except OrderError:
                raise
            except Exception as exc:
                tries = self._failures[entry.seq] = self._failures.get(entry.seq, 0) + 1
                if tries < self.max_tries:
                    raise
                log.error("%s: seq %d failed to apply %d times; dead-lettered: %r", self.name, entry.seq, tries, exc)
                self.store.mark_dead(entry.seq, entry.payload["edit_id"], "apply", repr(exc), tries)
                self.replica.skip(entry.seq)
                dead = True
            finally:
                self._advanced.notify_all()
        self._failures.pop(entry.seq, None)
        self._last_entry = (entry.seq, entry.payload["edit_id"], entry.at_ms)
        return not dead

    def _event(self, entry, applied_ms: float, artifact_bytes: int, op: str | None = None) -> dict:
        """One row of the edits log: a journal entry taking effect on this replica (op "dead": skipped)."""
        return {
            "seq": entry.seq,
            "edit_id": entry.payload["edit_id"],
            "op": op or entry.payload["op"],
            "method": self.method,
            "ingest_ms": entry.at_ms,
            "replica": self.name,
            "applied_ms": applied_ms,
            "latency_ms": applied_ms - entry.at_ms,
            "artifact_bytes": artifact_bytes,
        }

    def flush(self) -> None:
        self.wait_snapshot(timeout_s=120.0)
        if self.edit_log is not None:
            self.edit_log.close()

    def wait_version(self, min_version: int, timeout_s: float = 30.0) -> int:
        with self._advanced:
            self._advanced.wait_for(lambda: self.replica.version >= min_version, timeout=timeout_s)
            return self.replica.version

    def ask(
        self,
        prompts: list[str],
        max_new_tokens: int = 16,
        min_version: int = 0,
        timeout_s: float = 30.0,
        chat: bool = False,
        until_cut: bool = False,
        edited: bool = True,
        any_version: bool = False,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> list[dict]:
        """Answers with the edit that fired and the version that answered (`Replica.generate` says
        what chat, until_cut and edited do). A replica that has not replayed the journal yet waits
        until it is ready (up to `timeout_s`, then `NotReadyError`), unless `any_version`. sampling:
        draw the tokens (default: greedy). stop: decoding of a row ends once its text holds one."""
        self._wait_usable(min_version, timeout_s, any_version)
        answers = self._generate(
            prompts, max_new_tokens, edited=edited, chat=chat, until_cut=until_cut, sampling=sampling, stop=stop or ()
        )
        return [{**dataclasses.asdict(a), "replica": self.name} for a in answers]

    def ask_stream(
        self,
        prompt: str,
        max_new_tokens: int = 16,
        min_version: int = 0,
        timeout_s: float = 30.0,
        chat: bool = False,
        history: list[dict[str, str]] | None = None,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[dict]:
        """One answer as it is decoded: `{"text": piece}` per piece of text, then the answer's fields
        (as `ask` gives them, the whole text included) with `"done": True`. history (chat): the
        conversation's turns before `prompt`, its last user turn."""
        self._wait_usable(min_version, timeout_s, any_version=False)
        pieces: queue.Queue = queue.Queue()

        def run() -> None:
            try:
                (a,) = self._generate(
                    [prompt], max_new_tokens, chat=chat, history=[history or []] if chat else None,
                    on_text=lambda _row, piece: pieces.put({"text": piece}), sampling=sampling, stop=stop or (),
                )  # fmt: skip
                pieces.put({**dataclasses.asdict(a), "replica": self.name, "done": True})
            except Exception as e:  # noqa: BLE001 - handed to the caller
                pieces.put(e)

        threading.Thread(target=run, name=f"{self.name}-stream", daemon=True).start()
        while True:
            item = pieces.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.get("done"):
                return

    def _wait_usable(self, min_version: int, timeout_s: float, any_version: bool) -> None:
        """Wait until this replica is ready (unless `any_version`) and has applied `min_version`."""
        if not self.ready and not any_version:
            with self._advanced:
                if not self._advanced.wait_for(lambda: self.ready, timeout=timeout_s):
                    raise NotReadyError(
                        f"{self.name} is replaying the journal (at version {self.replica.version} of "
                        f"{self.catch_up_to or 'unknown: Redis not reached yet'}); ask again, or pass "
                        "any_version to read it as it is"
                    )
        if min_version:
            self.wait_version(min_version, timeout_s)

    def _generate(self, prompts: list[str], max_new_tokens: int, **options: Any) -> list:
        """`Replica.generate` under the locks its method needs."""
        if self.replica.method.decode_reads_state:
            with self._model_lock, self._lock:  # e.g. weight edits: an apply must not land mid-decode
                return self.replica.generate(prompts, max_new_tokens, **options)
        with self._model_lock:
            return self.replica.generate(prompts, max_new_tokens, state_lock=self._lock, **options)

    def active(self, edit_ids: list[str]) -> list[bool]:
        """Which of `edit_ids` are in effect (not retracted, not superseded): what evaluators may probe."""
        with self._lock:
            return [self.replica.method.is_active(e) for e in edit_ids]

    def score(self, contexts: list[str], answers: list[str], edited: bool = True) -> dict:
        """Teacher-forced argmax at answer tokens (for evaluators), with the version scored at."""
        with self._model_lock, self._lock:
            preds, ids, fired = self.replica.predict(contexts, answers, edited=edited)
            return {"predicted": preds, "answer_ids": ids, "fired": fired, "version": self.replica.version}

    def nll(self, texts: list[str]) -> dict:
        """Summed NLL and token count on `texts` (the evaluators' perplexity probe), with the version."""
        with self._model_lock, self._lock:
            total, count = self.replica.nll(texts)
            return {"nll": total, "tokens": count, "version": self.replica.version}

    def state(self, wait_s: float = 0.2, fresh: bool = True) -> dict:
        """Version, digest (of the state at `digest_version`), ready. Heartbeats and status must not
        hang behind a long query: if the replica is busy for `wait_s`, the last state read is
        returned, marked `"busy": true`. `fresh=False` (heartbeats) may give the digest of an earlier
        version rather than hash every applied edit again (see DIGEST_DUTY). The hash walks every
        live edit, so it runs after the lock is released, on the applied artifacts taken under it."""
        if not self._lock.acquire(timeout=wait_s):
            return {**self._state, "busy": True}
        try:
            version, digest, at, cost = self._digest_cache
            due = time.monotonic() - at >= max(DIGEST_MIN_S, DIGEST_DUTY * cost)
            todo = None
            if version != self.replica.version and (fresh or due):
                todo = (self.replica.version, self.replica.method.applied(), self._resets)
            state = {
                "name": self.name,
                "version": self.replica.version,
                "edits": self.replica.method.active_count(),
                "ready": self.ready,
                "node": self.node,
                "apply_busy_s": round(self.busy_s, 3),
            }
        finally:
            self._lock.release()
        if todo is not None and (fresh or version < 0):
            version, digest = self._hash(*todo)
        elif todo is not None:
            self._hash_beside(todo)  # a heartbeat: the next one carries it
        self._state = {**state, "digest": digest, "digest_version": version}
        return dict(self._state)

    def _hash_beside(self, todo: tuple[int, tuple, int]) -> None:
        """`_hash(*todo)` on a thread of its own (one at a time): a heartbeat's hash of a million edits
        (~0.4 s) would otherwise stall the apply loop that sends it, on every replica, every few seconds."""
        if self._hasher is not None and self._hasher.is_alive():
            return
        self._hasher = threading.Thread(target=self._hash, args=todo, name=f"{self.name}-digest", daemon=True)
        self._hasher.start()

    def _hash(self, version: int, applied: tuple, resets: int) -> tuple[int, str]:
        """(version, digest) of the applied artifacts taken at `version`; kept for heartbeats unless
        the state was reset meanwhile (the same version may then be another state)."""
        started = time.monotonic()
        digest = state_digest(version, self.replica.method.name, applied)
        if resets == self._resets:
            self._digest_cache = (version, digest, started, time.monotonic() - started)
        return version, digest

    def applied_times(self, seqs: list[int]) -> dict[int, float]:
        return {s: self.applied_at[s] for s in seqs if s in self.applied_at}
