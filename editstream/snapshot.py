"""Replica snapshots: one replica's edit state at a journal seq, so a restart replays only the tail.

A snapshot is a directory `snap-<seq>` in a snapshot store (a directory every node can read):
the method's state as `EditMethod.save_state` writes it (`write_state`: the applied artifacts back
to back with a JSON index) and a small `snapshot.json`: format, method, base-model fingerprint, the
seq, the journal entry at that seq (edit id and time, so a reader can check the journal still holds
it) and the state digest.

It is written under a temporary name and renamed, so a reader never sees half of one; the newest
`keep` are kept. Loading is `EditMethod.load_state` (the artifacts re-applied in their order) and
refuses a snapshot whose digest does not come out the same.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from editstream.artifacts import Artifact
from editstream.errors import ArtifactError
from editstream.methods.base import write_state
from editstream.replica import Replica

log = logging.getLogger(__name__)

FORMAT = 1
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
    """A replica's state taken under its lock (cheap: references to immutable artifacts); written
    to disk afterwards, outside the lock."""

    seq: int
    digest: str
    entry: tuple[str, float] | None
    method: str
    base_fingerprint: str
    artifacts: tuple[Artifact, ...]


def capture(replica: Replica, entry: tuple[str, float] | None) -> Capture:
    """The replica's edit state now; `entry`: the (edit id, time) of the journal entry at its version."""
    method = replica.method
    applied = tuple(method.artifact(e) for e in method.edit_ids())
    return Capture(replica.version, replica.digest(), entry, method.name, method.lm.fingerprint, applied)


def write_snapshot(state: Capture, store: Path, keep: int = KEEP) -> Path:
    """Write `state` as `store/snap-<seq>` (atomically) and drop all but the newest `keep`."""
    store.mkdir(parents=True, exist_ok=True)
    final = store / f"snap-{state.seq:012d}"
    if final.exists():
        return final
    tmp = store / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    size = write_state(tmp, state.method, state.base_fingerprint, state.artifacts)
    meta = {
        "format": FORMAT,
        "method": state.method,
        "base_fingerprint": state.base_fingerprint,
        "seq": state.seq,
        "entry": list(state.entry) if state.entry else None,
        "digest": state.digest,
    }
    (tmp / META).write_text(json.dumps(meta))
    tmp.rename(final)
    for old in snapshots(store)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)
    log.info("snapshot at seq %d: %d artifacts, %.1f MB in %s", state.seq, len(state.artifacts), size / 1e6, final)
    return final


def snapshots(store: Path, method: str | None = None, fingerprint: str | None = None) -> list[SnapshotInfo]:
    """Complete snapshots in `store`, newest first (optionally only those of a method and base model)."""
    found = []
    for path in sorted(store.glob("snap-*"), reverse=True) if store.is_dir() else []:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable snapshot %s: %s", path, exc)
            continue
        if meta.get("format") != FORMAT:
            log.warning("skipping snapshot %s: format %r, this code reads %d", path, meta.get("format"), FORMAT)
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
