"""Replica snapshots: one replica's edit state at a journal seq, so a restart replays only the tail.

A snapshot is a directory `snap-<seq>` in a snapshot store (a directory every node can read):
the method's state in `editstream.packs`' form (the applied artifacts in pack files with a JSON
index, and `derived.safetensors` where the method carries what it derived from them, such as
RECIPE's IVF lists) and a small `snapshot.json`: format, method, base-model fingerprint, the seq, the journal
entry at that seq (edit id and time, so a reader can check the journal still holds it) and the
state digest.

Snapshots are incremental: a new one writes only the artifacts the newest earlier snapshot does not
hold into a pack of its own and hard-links that snapshot's packs (a pack mostly dead by now is
copied from instead, live artifacts only), so taking one costs the edits since the last, not every
live edit; a `SnapshotWriter` also keeps where its last snapshot put each artifact, so it need not
read that snapshot's index back either. Each snapshot directory is complete on its own: dropping
an older one drops nothing a newer one reads.

It is written under a temporary name and renamed, so a reader never sees half of one; the newest
`keep` are kept. Loading is `EditMethod.load_state` (the artifacts read packed, in bulk: only the
newest edit of each prompt is attached, RECIPE's keys in one faiss call) and
refuses a snapshot whose digest does not come out the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editstream.artifacts import PackedArtifact
from editstream.errors import ArtifactError
from editstream.packs import Placed, write_derived, write_state
from editstream.replica import Replica, state_digest

log = logging.getLogger(__name__)

FORMAT = 2  # 2: incremental packs (editstream.packs)
READS = (1, 2)  # 1: one pack, written before 9f9912f (a replica upgraded under --compact still starts)
KEEP = 2
META = "snapshot.json"


@dataclass(frozen=True)
class SnapshotInfo:
    """What `snapshot.json` says of one snapshot."""

    path: Path
    seq: int
    digest: str
    entry: tuple[str, float] | None  # (edit id, time in ms) of the journal entry at `seq`
    method: str
    base_fingerprint: str


@dataclass(frozen=True)
class Capture:
    """A replica's state taken under its lock (cheap: references to immutable packed artifacts); its
    digest and the files are made afterwards, outside the lock (both walk every live edit)."""

    seq: int
    entry: tuple[str, float] | None
    method: str
    base_fingerprint: str
    artifacts: tuple[PackedArtifact, ...]  # their content digests are known (computed when applied)
    derived: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's `derived_state()`

    @functools.cached_property
    def digest(self) -> str:
        """The replica's digest at this state (`Replica.digest`)."""
        return state_digest(self.seq, self.method, self.artifacts)


def capture(replica: Replica, entry: tuple[str, float] | None) -> Capture:
    """The replica's edit state now; `entry`: the (edit id, time) of the journal entry at its version."""
    method = replica.method
    fingerprint, derived = method.lm.fingerprint, method.derived_state()
    return Capture(replica.version, entry, method.name, fingerprint, method.applied(), derived)


class SnapshotWriter:
    """Writes a replica's snapshots to a store, keeping where the last one put each artifact: the next
    snapshot then matches the edits still live by identity instead of reading the last index back and
    walking every live edit in Python (a million-edit replica's snapshot takes its apply loop's
    interpreter lock for about a second, not twenty)."""

    def __init__(self, store: Path, keep: int = KEEP) -> None:
        self.store = store
        self.keep = keep
        self._last: Placed | None = None  # what the last write placed where (None: read it back)

    def write(self, state: Capture) -> Path:
        """Write `state` as `store/snap-<seq>` (atomically, reusing the packs of the newest earlier
        snapshot of the same method and base model) and drop all but the newest `keep`."""
        started, store = time.perf_counter(), self.store
        store.mkdir(parents=True, exist_ok=True)
        final = store / f"snap-{state.seq:012d}"
        if final.exists():
            return final
        tmp = store / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [s for s in snapshots(store, state.method, state.base_fingerprint) if s.seq < state.seq]
        previous: Path | Placed | None = earlier[0].path if earlier else None
        if self._last is not None and self._last.directory == previous:
            previous = self._last
        pack = f"pack-{state.seq:012d}.bin"
        try:
            written = write_state(tmp, state.method, state.base_fingerprint, state.artifacts, pack, previous)
        except (ArtifactError, OSError) as exc:  # an unreadable earlier snapshot: write this one whole
            where = previous.directory if isinstance(previous, Placed) else previous
            log.warning("snapshot at seq %d: not reusing %s (%s); writing every artifact", state.seq, where, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            written = write_state(tmp, state.method, state.base_fingerprint, state.artifacts, pack)
        meta = {
            "format": FORMAT,
            "method": state.method,
            "base_fingerprint": state.base_fingerprint,
            "seq": state.seq,
            "entry": list(state.entry) if state.entry else None,
            "digest": state.digest,
        }
        write_derived(tmp, state.derived)
        (tmp / META).write_text(json.dumps(meta))
        tmp.rename(final)
        self._last = dataclasses.replace(written.placed, directory=final)
        for old in snapshots(store)[self.keep :]:
            shutil.rmtree(old.path, ignore_errors=True)
        log.info(
            "snapshot at seq %d: %d artifacts, %d written (%.1f MB), %.1f MB reused from %s (%s), %.2f s; in %s",
            state.seq,
            len(state.artifacts),
            written.artifacts_written,
            written.written / 1e6,
            written.linked / 1e6,
            earlier[0].path.name if earlier else "none",
            "kept in memory" if isinstance(previous, Placed) else "index read back",
            time.perf_counter() - started,
            final,
        )
        return final


def write_snapshot(state: Capture, store: Path, keep: int = KEEP) -> Path:
    """Write `state` as `store/snap-<seq>` (`SnapshotWriter.write` with nothing kept from before:
    the newest earlier snapshot's index is read back)."""
    return SnapshotWriter(store, keep).write(state)


def snapshots(store: Path, method: str | None = None, fingerprint: str | None = None) -> list[SnapshotInfo]:
    """Complete snapshots in `store`, newest first (optionally only those of a method and base model)."""
    found = []
    for path in sorted(store.glob("snap-*"), reverse=True) if store.is_dir() else []:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable snapshot %s: %s", path, exc)
            continue
        if meta.get("format") not in READS:
            log.warning("skipping snapshot %s: format %r, this code reads %s", path, meta.get("format"), READS)
            continue
        info = SnapshotInfo(
            path,
            int(meta["seq"]),
            meta["digest"],
            tuple(meta["entry"]) if meta.get("entry") else None,
            meta["method"],
            meta["base_fingerprint"],
        )
        if method in (None, info.method) and fingerprint in (None, info.base_fingerprint):
            found.append(info)
    return found


def load_snapshot(replica: Replica, info: SnapshotInfo) -> None:
    """Replace the replica's edit state with the snapshot's; ArtifactError if it does not fit or its
    digest does not come out the same (the replica is then back at the unedited model, version 0)."""
    method = replica.method
    if (info.method, info.base_fingerprint) != (method.name, method.lm.fingerprint):
        raise ArtifactError(
            f"snapshot {info.path} is of {info.method} on base model {info.base_fingerprint}; this replica "
            f"runs {method.name} on {method.lm.fingerprint}"
        )
    try:
        method.load_state(info.path)
        replica.version = info.seq
        got = replica.digest()
        if got != info.digest:
            raise ArtifactError(f"snapshot {info.path}: state digest {got} after loading, it says {info.digest}")
    except Exception:
        method.reset()
        replica.version = 0
        raise
