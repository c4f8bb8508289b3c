"""A method's edit state on disk: artifacts packed back to back in append-only files, indexed in apply order.

A state directory holds `state.json` (format, method, base-model fingerprint, the pack files and, per
applied artifact in apply order, its edit id, pack, offset, length and the first 16 hex digits of its
content digest) and the pack files it names. Pack files never change once written, so a new state
can reuse an older state's packs: `write_state(..., previous=older)` writes only the artifacts the
older state does not hold into one new pack and hard-links the older packs it still reads (a copy
where the file system has no hard links). A pack of which less than `min_live` of the bytes is still
read is not linked: its live artifacts are copied into the new pack, so dead bytes do not pile up.
Writing a state is then O(new artifacts) in serialisation and I/O, plus the O(live) index.

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
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import orjson
import torch
from safetensors.torch import load_file, save_file

from editstream.artifacts import Artifact, PackedArtifact
from editstream.errors import ArtifactError

log = logging.getLogger(__name__)
Read = TypeVar("Read", Artifact, PackedArtifact)

FORMAT = 2
STATE = "state.json"
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
class Written:
    """What `write_state` did: bytes written to the new pack, bytes of older packs reused by link."""

    written: int
    linked: int
    artifacts_written: int


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
    previous: Path | None = None,
    min_live: float = 0.5,
) -> Written:
    """Write a state of `artifacts` (in apply order) to `directory`: those `previous` (an older state
    directory of the same method and base model) holds with the same digest are linked from its
    packs, the rest go to the new pack `pack`."""
    old = _reusable(previous, method, fingerprint)
    sizes = {name: (previous / name).stat().st_size for name in {e.pack for e in old.values()}} if previous else {}
    if pack in sizes:
        raise ArtifactError(f"{directory}: the new pack {pack!r} has the name of a pack it would reuse")
    plan: list[Entry | Artifact | PackedArtifact] = []
    for artifact in artifacts:
        entry = old.get(artifact.edit_id)
        same = entry is not None and entry.digest == artifact.content_digest()[:DIGEST_CHARS]  # None: never
        plan.append(entry if same else artifact)
    live = Counter()
    for item in plan:
        if isinstance(item, Entry):
            live[item.pack] += item.length
    kept = {name for name, n in live.items() if n >= min_live * sizes[name]}
    directory.mkdir(parents=True, exist_ok=True)
    entries, offset, fresh = [], 0, 0
    with ExitStack() as stack:
        out = stack.enter_context((directory / pack).open("wb"))
        sparse = {name: stack.enter_context((previous / name).open("rb")) for name in live.keys() - kept}
        for item in plan:
            if isinstance(item, Entry) and item.pack in kept:
                entries.append(item)
                continue
            if isinstance(item, Entry):  # live bytes of a mostly dead pack: copied as they are
                source = sparse[item.pack]
                source.seek(item.offset)
                blob, edit_id, digest = source.read(item.length), item.edit_id, item.digest
            else:
                blob, edit_id, digest = item.to_bytes(), item.edit_id, item.content_digest()[:DIGEST_CHARS]
                fresh += 1
            out.write(blob)
            entries.append(Entry(edit_id, pack, offset, len(blob), digest))
            offset += len(blob)
    for name in sorted(kept):
        link_or_copy(previous / name, directory / name)
    names = [pack, *sorted(kept)]
    where = {name: i for i, name in enumerate(names)}
    state = {
        "format": FORMAT,
        "method": method,
        "base_fingerprint": fingerprint,
        "packs": names,
        "order": [[e.edit_id, where[e.pack], e.offset, e.length, e.digest] for e in entries],
    }
    (directory / STATE).write_bytes(orjson.dumps(state))
    return Written(offset, sum(sizes[name] for name in kept), fresh)


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


def _reusable(previous: Path | None, method: str, fingerprint: str) -> dict[str, Entry]:
    """The entries of `previous` by edit id, if it is a readable state of the same method and model."""
    if previous is None:
        return {}
    index = read_index(previous)
    if (index.method, index.base_fingerprint) != (method, fingerprint):
        raise ArtifactError(
            f"{previous} holds {index.method} on {index.base_fingerprint}, not {method} on {fingerprint}"
        )
    return {e.edit_id: e for e in index.entries}


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` as `target`; copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError as exc:
        log.debug("no hard link for %s (%s); copying", source, exc)
        shutil.copyfile(source, target)
