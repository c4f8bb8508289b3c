"""A method's edit state on disk: artifacts packed back to back in append-only files, indexed in apply order.

A state directory holds `state.json` (format, method, base-model fingerprint, the pack files and, per
applied artifact in apply order, its edit id, pack, offset, length and the first 16 hex digits of its
content digest) and the pack files it names. Pack files never change once written, so a new state
can reuse an older state's packs: `write_state(..., previous=older)` writes only the artifacts the
older state does not hold into one new pack and hard-links the older packs it still reads (a copy
where the file system has no hard links). A pack of which less than `min_live` of the bytes is still
read is not linked: its live artifacts are copied into the new pack, so dead bytes do not pile up.
Writing a state is then O(new artifacts) in serialisation and I/O, plus the O(live) index. Given
what writing the older state returned (`Written.placed`) instead of its directory, the older index
is not read back either: the edits still live are found by identity, in C loops (a million-edit
state's next snapshot costs about a second of Python, not ten).

Reading checks every artifact's edit id and digest against the index, so a torn or altered pack is
refused, never half-loaded silently.

Beside them a state may hold `derived.safetensors`: what the method derived from its artifacts and
would otherwise derive again on loading (the IVF lists of RECIPE's key index). It only saves time:
a state without it, or with one that does not read, loads the same edits.
"""

from __future__ import annotations

import gc
import logging
import mmap
import operator
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import orjson
import torch
from safetensors.torch import load_file, save_file

from editstream.artifacts import Artifact, PackedArtifact
from editstream.errors import ArtifactError

log = logging.getLogger(__name__)
Read = TypeVar("Read", Artifact, PackedArtifact)

FORMAT = 2
STATE = "state.json"
# Artifacts per bulk step of a state write. A snapshot is written on a thread beside the replica's apply
# loop; one C-level pass over a million artifacts (a set of ids, a JSON dump) holds the interpreter
# lock for hundreds of ms, which the apply loop then waits out. In steps of this many it waits ~5 ms.
STEP = 16384
DERIVED = "derived.safetensors"
DIGEST_CHARS = 16  # of the sha256 content digest, per artifact in the index
PACK_V1 = "artifacts.bin"  # format 1 (before incremental packs): one pack, read still


class Entry(NamedTuple):
    """Where one applied artifact's bytes are (a tuple: a state index makes a million of them)."""

    edit_id: str
    pack: str
    offset: int
    length: int
    digest: str | None  # the first DIGEST_CHARS hex digits of its content digest (None: format 1)


@dataclass(frozen=True)
class StateIndex:
    """What `state.json` says: whose state it is and its artifacts in apply order."""

    method: str
    base_fingerprint: str
    entries: list[Entry]


@dataclass(frozen=True)
class Placed:
    """Where a written state put its artifacts, kept by its writer so that the next state need not read
    this one's index back: the artifacts themselves (the objects, in apply order) and, row by row, the
    number of each one's pack in `packs`, its offset and its length."""

    directory: Path
    method: str
    fingerprint: str
    packs: list[str]
    artifacts: tuple[Artifact | PackedArtifact, ...]
    pack: np.ndarray  # int64, a row per artifact
    offset: np.ndarray
    length: np.ndarray

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.pack, self.offset, self.length


@dataclass(frozen=True)
class Written:
    """What `write_state` did: bytes written to the new pack, bytes of older packs reused by link, and
    where every artifact now is (pass it as the next state's `previous`)."""

    written: int
    linked: int
    artifacts_written: int
    placed: Placed


def read_index(directory: Path) -> StateIndex:
    """The index of the state in `directory`; ArtifactError if it is not one this code reads."""
    try:
        state = orjson.loads((directory / STATE).read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory / STATE}: not a readable edit state ({exc})") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"{directory / STATE}: a {type(state).__name__}, not an edit state")
    if "format" not in state and "packs" not in state:  # format 1: one pack, entries without digests
        state = {
            **state,
            "format": FORMAT,
            "packs": [PACK_V1],
            "order": [[*e[:1], 0, *e[1:3], None] for e in state["order"]],
        }
    if state.get("format") != FORMAT:
        raise ArtifactError(f"{directory / STATE}: state format {state.get('format')!r}, this code reads {FORMAT}")
    packs = state["packs"]
    entries = [Entry(i, packs[p], offset, length, digest) for i, p, offset, length, digest in state["order"]]
    return StateIndex(state["method"], state["base_fingerprint"], entries)


def write_state(
    directory: Path,
    method: str,
    fingerprint: str,
    artifacts: Iterable[Artifact | PackedArtifact],
    pack: str = "pack-0.bin",
    previous: Path | Placed | None = None,
    min_live: float = 0.5,
) -> Written:
    """Write a state of `artifacts` (in apply order) to `directory`: those an older state of the same
    method and base model holds with the same digest are linked from its packs, the rest go to the
    new pack `pack`. `previous` is that state's directory (its index is read and matched by edit id
    and digest: O(live) in Python) or what writing it returned (matched by identity: the artifacts
    it held that are still live, then the new ones, is what an edit state becomes; O(new) in Python)."""
    artifacts = tuple(artifacts)
    digests = [a.content_digest()[:DIGEST_CHARS] for a in artifacts]
    old, rows = _reusable(previous, method, fingerprint, artifacts, digests)
    sizes = {name: (old.directory / name).stat().st_size for name in old.packs}
    if pack in sizes:
        raise ArtifactError(f"{directory}: the new pack {pack!r} has the name of a pack it would reuse")
    # each artifact's pack, offset and length in the older state (row -1, not there: pack -1)
    source, offset, length = (
        np.append(column, fill)[rows] for column, fill in zip(old.columns(), (-1, 0, 0), strict=True)
    )
    found = source >= 0
    live = np.bincount(source[found], weights=length[found], minlength=len(old.packs))
    kept = sorted(name for i, name in enumerate(old.packs) if live[i] and live[i] >= min_live * sizes[name])
    names = [pack, *kept]
    renumber = np.full(len(old.packs) + 1, -1, dtype=np.int64)  # the last: for pack -1
    for name in kept:
        renumber[old.packs.index(name)] = names.index(name)
    new_pack = renumber[source]
    linked = new_pack >= 0
    new_pack[~linked] = 0
    directory.mkdir(parents=True, exist_ok=True)
    at, fresh = 0, 0
    with ExitStack() as stack:
        out = stack.enter_context((directory / pack).open("wb"))
        copied = set(source[~linked].tolist()) - {-1}
        sparse = {i: stack.enter_context((old.directory / old.packs[i]).open("rb")) for i in copied}
        for i in np.flatnonzero(~linked).tolist():
            if source[i] >= 0:  # live bytes of a mostly dead pack: copied as they are
                f = sparse[int(source[i])]
                f.seek(int(offset[i]))
                blob = f.read(int(length[i]))
            else:
                blob = artifacts[i].to_bytes()
                fresh += 1
            out.write(blob)
            offset[i], length[i] = at, len(blob)
            at += len(blob)
    for name in kept:
        link_or_copy(old.directory / name, directory / name)
    state = {"format": FORMAT, "method": method, "base_fingerprint": fingerprint, "packs": names, "order": []}
    head = orjson.dumps(state)  # ends in `"order":[]}`: the rows go in between, dumped a step at a time
    rows = (
        orjson.dumps(
            list(
                zip(
                    [a.edit_id for a in artifacts[i : i + STEP]],
                    new_pack[i : i + STEP].tolist(),
                    offset[i : i + STEP].tolist(),
                    length[i : i + STEP].tolist(),
                    digests[i : i + STEP],
                    strict=True,
                )
            )
        )[1:-1]
        for i in range(0, len(artifacts), STEP)
    )
    (directory / STATE).write_bytes(head[:-2] + b",".join(rows) + b"]}")
    placed = Placed(directory, method, fingerprint, names, artifacts, new_pack, offset, length)
    return Written(at, sum(sizes[name] for name in kept), fresh, placed)


def read_artifacts(
    directory: Path, index: StateIndex, read: Callable[[bytes], Read] = Artifact.from_bytes
) -> Iterator[Read]:
    """The state's artifacts in apply order, each checked against its index entry; `read`:
    `PackedArtifact.from_bytes` to have them packed (no tensors made)."""
    with ExitStack() as stack:
        maps: dict[str, mmap.mmap] = {}
        for name in {e.pack for e in index.entries}:
            with (directory / name).open("rb") as f:
                maps[name] = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        for e in index.entries:
            try:
                artifact = read(maps[e.pack][e.offset : e.offset + e.length])
            except ArtifactError as exc:
                raise ArtifactError(f"{_place(directory, e)}: {exc}") from exc
            digest = artifact.content_digest()[:DIGEST_CHARS]
            if artifact.edit_id != e.edit_id or e.digest not in (None, digest):
                raise ArtifactError(
                    f"{_place(directory, e)} are not artifact {e.edit_id} (digest {e.digest}) as {STATE} says"
                )
            yield artifact


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a state's million (acyclic) objects are made: each
    collection would scan every one made so far (a quarter of a million-edit load); on again after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def write_derived(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a method's derived state beside its artifacts (nothing when there is none)."""
    if tensors:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / DERIVED))


def read_derived(directory: Path) -> dict[str, torch.Tensor]:
    """The derived state written beside a state's artifacts; {} (with a warning) if there is none readable."""
    path = directory / DERIVED
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own errors; the state loads without it
        log.warning("%s not read (%s): derived again from the artifacts", path, exc)
        return {}


def _place(directory: Path, e: Entry) -> str:
    return f"{directory / e.pack}: the {e.length} bytes at {e.offset}"


def _reusable(
    previous: Path | Placed | None,
    method: str,
    fingerprint: str,
    artifacts: tuple[Artifact | PackedArtifact, ...],
    digests: list[str],
) -> tuple[Placed, np.ndarray]:
    """The older state (as `Placed`) and, per artifact, its row there (-1: not there, or changed)."""
    none = np.full(len(artifacts), -1, dtype=np.int64)
    if previous is None:
        return Placed(Path(), method, fingerprint, [], (), *(np.zeros(0, dtype=np.int64),) * 3), none
    if isinstance(previous, Placed):
        if (previous.method, previous.fingerprint) != (method, fingerprint):
            raise ArtifactError(
                f"{previous.directory} holds {previous.method} on {previous.fingerprint}, not {method} on {fingerprint}"
            )
        rows = _still_live(previous.artifacts, artifacts)
        if rows is not None:
            return previous, rows
        log.info(
            "%s: the edit state is not the one written there plus new edits; matching by edit id", previous.directory
        )
        previous = previous.directory
    index = read_index(previous)
    if (index.method, index.base_fingerprint) != (method, fingerprint):
        raise ArtifactError(
            f"{previous} holds {index.method} on {index.base_fingerprint}, not {method} on {fingerprint}"
        )
    packs = sorted({e.pack for e in index.entries})
    number = {name: i for i, name in enumerate(packs)}
    where = {e.edit_id: row for row, e in enumerate(index.entries)}
    entries = index.entries
    rows = np.fromiter(
        (
            row if (row := where.get(a.edit_id, -1)) >= 0 and entries[row].digest == digest else -1  # None: never
            for a, digest in zip(artifacts, digests, strict=True)
        ),
        dtype=np.int64,
        count=len(artifacts),
    )
    columns = (
        np.fromiter((number[e.pack] for e in entries), dtype=np.int64, count=len(entries)),
        np.fromiter((e.offset for e in entries), dtype=np.int64, count=len(entries)),
        np.fromiter((e.length for e in entries), dtype=np.int64, count=len(entries)),
    )
    return Placed(previous, method, fingerprint, packs, (), *columns), rows


def _still_live(before: tuple, now: tuple) -> np.ndarray | None:
    """Per artifact of `now` its row in `before` (-1: new), if `now` is `before` with some artifacts
    gone and new ones after them (what applies, supersedes and retracts make of an edit state); else,
    or if most of `before` is not found (a state loaded again is made of other objects), None."""
    ids: set[int] = set()  # both tuples hold their objects alive, so equal ids are the same object
    for i in range(0, len(now), STEP):  # each pass in steps (STEP)
        ids.update(map(id, now[i : i + STEP]))
    alive = np.zeros(len(before), dtype=bool)
    for i in range(0, len(before), STEP):
        part = before[i : i + STEP]
        alive[i : i + len(part)] = np.fromiter(map(ids.__contains__, map(id, part)), dtype=bool, count=len(part))
    rows = np.flatnonzero(alive)
    if len(rows) > len(now) or 2 * len(rows) < len(before):
        return None
    for i in range(0, len(rows), STEP):
        if not all(map(operator.is_, (before[r] for r in rows[i : i + STEP].tolist()), now[i : i + STEP])):
            return None
    return np.concatenate([rows, np.full(len(now) - len(rows), -1, dtype=np.int64)])


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` as `target`; copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError as exc:
        log.debug("no hard link for %s (%s); copying", source, exc)
        shutil.copyfile(source, target)
