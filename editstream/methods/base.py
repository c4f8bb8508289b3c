"""The editing-method contract every method implements, and the bookkeeping they share.

`compute(edits) -> artifacts` never touches a model's weights or edit state. `apply(artifact)`
attaches one edit; `remove(edit_id)` detaches it. A newer edit for the same prompt supersedes the
older one (only the newest is attached); removing the newest re-attaches the one it superseded,
so a retract makes the model answer as it did before that edit. Save/load and the state digest
work on the applied artifacts, so they are the same for every method.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import torch

from editstream.artifacts import Artifact, PackedArtifact
from editstream.edits import EditRequest, normalize_prompt
from editstream.errors import ArtifactError
from editstream.models import LoadedLM
from editstream.packs import gc_paused, read_artifacts, read_derived, read_index, write_derived, write_state

log = logging.getLogger(__name__)


@dataclass
class QueryPlan:
    """How a batch of prompts is served: the context texts the LM reads, and which edit fired per row.

    Decoding may drop finished rows from the batch. A method whose hooks hold per-row state says how
    to follow (`select_rows(indices)`, called with the rows that go on) or that it cannot
    (`shrinkable=False`). `set_offsets` (when a template wraps the texts) is called before decoding."""

    texts: list[str]
    fired: list[str | None]
    select_rows: Callable[[Any], None] | None = None
    shrinkable: bool = True
    # A method that places vectors before the prompt (a soft prefix) is told, per row, how many
    # tokens of the text the model reads come before the prompt (a chat template's head).
    set_offsets: Callable[[Any], None] | None = None


class EditMethod(ABC):
    """Base class of editing methods; subclasses implement compute, _attach, _detach, maybe query_context."""

    name: ClassVar[str]
    sequential: ClassVar[bool] = False  # True: each edit is computed on top of the earlier ones
    batch_edits: ClassVar[bool] = False  # sequential methods: True if compute solves a batch jointly
    # Journal entries an editor takes at a time. Methods that spend seconds per edit take few, so a
    # burst of facts is shared among parallel editors instead of queueing behind the first one.
    editor_batch: ClassVar[int] = 128
    # True: an edit acts only through `query_context` (the weights stay the base model's), so a
    # generation can let it go after the answer (see `edit_scope`).
    plan_only: ClassVar[bool] = False
    # False: everything a generation needs from the edit state is copied when its plan is built
    # (retrieval hits, prefix tensors), so edits may be applied while it decodes.
    decode_reads_state: ClassVar[bool] = True

    def __init__(self, lm: LoadedLM) -> None:
        self.lm = lm
        # every applied, not-removed edit, in apply order, packed (a few hundred bytes over its data)
        self._applied: dict[str, PackedArtifact] = {}
        self._stacks: dict[str, list[str]] = {}  # normalized prompt -> edit ids, newest last (attached)
        # A prompt stored with an edit fires that edit without a search (a product fast path). The
        # quality benchmark turns it off to measure the retriever itself.
        self.exact_lookup = True
        # How long a fired edit shapes a generation (plan-only methods): "answer" = until the row has
        # said the edit's target or reached the first WILD stop (".", newline), after which the base
        # model continues the text it now holds; "text" = the whole generation. Weight edits are
        # always in effect.
        self.edit_scope = "answer"

    @classmethod
    def build(cls, lm: LoadedLM, **options: Any) -> EditMethod:
        """Construct from a loaded LM and method options (checkpoint paths and the like)."""
        if options:
            raise ArtifactError(f"method {cls.name!r} takes no options, got {sorted(options)}")
        return cls(lm)

    # --- the contract -------------------------------------------------------------------------
    @abstractmethod
    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        """Artifacts for `edits`, one each, in order. Must not change the model or the edit state."""

    @abstractmethod
    def _attach(self, artifact: Artifact) -> None:
        """Make `artifact` take effect; leave everything unchanged if it raises."""

    @abstractmethod
    def _detach(self, edit_id: str) -> None:
        """Undo `_attach` for `edit_id`."""

    @contextmanager
    def query_context(self, prompts: Sequence[str]) -> Iterator[QueryPlan]:
        """Serve `prompts` with the edits in effect; the default changes nothing at query time."""
        yield QueryPlan(list(prompts), [None] * len(prompts))

    # --- shared bookkeeping -------------------------------------------------------------------
    def new_artifact(self, edit: EditRequest, tensors: dict, **meta: Any) -> Artifact:
        """An artifact of this method for `edit`, carrying the prompt and target."""
        return Artifact(
            method=self.name,
            edit_id=edit.edit_id,
            base_fingerprint=self.lm.fingerprint,
            tensors=tensors,
            meta={"prompt": edit.prompt, "target": edit.target, "subject": edit.subject or "", **meta},
        )

    def check(self, artifact: Artifact | PackedArtifact) -> None:
        if artifact.method != self.name:
            raise ArtifactError(f"artifact {artifact.edit_id} is for method {artifact.method!r}, not {self.name!r}")
        if artifact.base_fingerprint != self.lm.fingerprint:
            raise ArtifactError(
                f"artifact {artifact.edit_id} was computed for base model {artifact.base_fingerprint}, "
                f"this replica serves {self.lm.fingerprint}"
            )
        if artifact.get("prompt") is None:
            raise ArtifactError(f"artifact {artifact.edit_id} has no prompt in its metadata")

    def apply(self, artifact: Artifact) -> bool:
        """Attach `artifact` (superseding an edit of the same prompt); False if already applied."""
        self.check(artifact)
        if artifact.edit_id in self._applied:
            return False
        stack = self._stacks.setdefault(normalize_prompt(artifact.meta["prompt"]), [])
        if stack:
            self._detach(stack[-1])
        try:
            self._attach(artifact)
        except Exception:
            if stack:
                self._attach(self._applied[stack[-1]].unpack())
            raise
        stack.append(artifact.edit_id)
        self._applied[artifact.edit_id] = PackedArtifact(artifact)  # computes the content digest, once
        return True

    def remove(self, edit_id: str) -> bool:
        """Detach `edit_id`; if it superseded an older edit, that one takes effect again."""
        artifact = self._applied.get(edit_id)
        if artifact is None:
            return False
        key = normalize_prompt(artifact.get("prompt"))
        stack = self._stacks[key]
        if stack[-1] == edit_id:
            self._detach(edit_id)  # the artifact is still registered while it is detached
            stack.pop()
            if stack:
                self._attach(self._applied[stack[-1]].unpack())
        else:
            stack.remove(edit_id)
        del self._applied[edit_id]
        if not stack:
            del self._stacks[key]
        return True

    def reset(self) -> None:
        """Remove every edit: back to the unedited model."""
        for edit_id in reversed(list(self._applied)):
            self.remove(edit_id)

    def edit_ids(self) -> list[str]:
        return list(self._applied)

    def exact_edits(self, prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, the edit in effect for exactly that prompt (after normalisation), or None;
        all None while `exact_lookup` is off."""
        if not self.exact_lookup:
            return [None] * len(prompts)
        stacks = [self._stacks.get(normalize_prompt(p)) for p in prompts]
        return [stack[-1] if stack else None for stack in stacks]

    def meta_of(self, edit_id: str) -> dict[str, Any]:
        """The metadata (prompt, target, subject) of an applied edit; empty if it is not applied."""
        artifact = self._applied.get(edit_id)
        return artifact.meta if artifact is not None else {}

    def target_of(self, edit_id: str) -> str | None:
        """The target text of an applied edit (None if it is not applied)."""
        artifact = self._applied.get(edit_id)
        return artifact.get("target") if artifact is not None else None

    def is_active(self, edit_id: str) -> bool:
        """Whether `edit_id` is in effect now (applied, not retracted, not superseded)."""
        artifact = self._applied.get(edit_id)
        if artifact is None:
            return False
        return self._stacks[normalize_prompt(artifact.get("prompt"))][-1] == edit_id

    def active_edit_ids(self) -> list[str]:
        """Edits now in effect (the newest of each prompt)."""
        return [stack[-1] for stack in self._stacks.values()]

    def active_count(self) -> int:
        """How many edits are in effect (one per prompt), without listing them."""
        return len(self._stacks)

    def artifact(self, edit_id: str) -> Artifact:
        """An applied edit's artifact, unpacked (a copy: changing it changes nothing applied)."""
        return self._applied[edit_id].unpack()

    def applied(self) -> tuple[PackedArtifact, ...]:
        """The applied artifacts in apply order, as kept (one C-level copy: a snapshot takes it under
        the replica's lock, and a million edits must not hold that lock for long)."""
        return tuple(self._applied.values())

    def digest(self) -> str:
        """Hash of the applied artifacts in apply order: equal on replicas that applied the same stream."""
        return edits_digest(self.name, self._applied.values())

    def save_state(self, directory: Path) -> None:
        """Write the applied artifacts and their order (`editstream.packs`); `load_state` restores the same state."""
        write_state(directory, self.name, self.lm.fingerprint, self._applied.values())
        write_derived(directory, self.derived_state())

    def load_state(self, directory: Path) -> None:
        """Replace the edit state with the one `save_state` (or `packs.write_state`) wrote: the
        artifacts read packed and applied in their order in bulk (`apply_packed`), which rebuilds
        superseded edits' stacks exactly."""
        index = read_index(directory)
        if index.method != self.name:
            raise ArtifactError(f"state in {directory} is for method {index.method!r}, not {self.name!r}")
        self.reset()
        self.seed_derived(read_derived(directory))
        try:
            with gc_paused():
                self.apply_packed(list(read_artifacts(directory, index, PackedArtifact.from_bytes)))
        except Exception:
            self.reset()
            raise

    def derived_state(self) -> dict[str, torch.Tensor]:
        """What this method derived from its artifacts and a state can carry so that loading need not
        derive it again (RECIPE: its key index's IVF lists); none by default."""
        return {}

    def seed_derived(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use `tensors` (a `derived_state()`) for the artifacts about to be applied in bulk; ignored by default."""
        return None

    def apply_packed(self, packed: Sequence[PackedArtifact]) -> None:
        """Apply `packed` in order onto an empty edit state, leaving it as `apply` one by one would,
        but attaching only the newest edit of each prompt, in one `_attach_many` (a snapshot of a
        million edits loads in bulk). On an error the state is empty again."""
        if self._applied:
            raise ArtifactError(f"apply_packed needs an empty edit state; {len(self._applied)} edits are applied")
        try:
            for p in packed:
                self.check(p)
                if p.edit_id not in self._applied:
                    self._stacks.setdefault(normalize_prompt(p.get("prompt")), []).append(p.edit_id)
                    self._applied[p.edit_id] = p
            newest = {stack[-1] for stack in self._stacks.values()}
            self._attach_many([p for p in self._applied.values() if p.edit_id in newest])
        except Exception:
            self._applied.clear()
            self._stacks.clear()
            raise

    def _attach_many(self, packed: Sequence[PackedArtifact]) -> None:
        """`_attach` each of `packed` (none attached yet), or none of them if one fails; methods
        that can attach in bulk override it."""
        done: list[str] = []
        try:
            for p in packed:
                self._attach(p.unpack())
                done.append(p.edit_id)
        except Exception:
            for edit_id in reversed(done):
                self._detach(edit_id)
            raise


def edits_digest(method: str, artifacts: Iterable[Artifact | PackedArtifact]) -> str:
    """`EditMethod.digest` of a method that applied `artifacts` in this order."""
    h = hashlib.sha256(method.encode())
    chunk = iter(artifacts)  # the hash of edit id and hex digest after edit id and hex digest, a chunk per update
    while part := "".join([a.edit_id + a.content_digest() for a in islice(chunk, 65_536)]):
        h.update(part.encode())
    return h.hexdigest()[:16]
