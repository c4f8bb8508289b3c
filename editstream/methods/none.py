"""`none`: the unedited model. Its artifacts record the edit and change nothing (a baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from editstream.artifacts import Artifact
from editstream.edits import EditRequest
from editstream.methods.base import EditMethod


class NoEdit(EditMethod):
    """Accepts edits and ignores them: the unedited model, through the same contract."""

    name = "none"
    plan_only = True

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        return [self.new_artifact(e, {}) for e in edits]

    def _attach(self, artifact: Artifact) -> None:
        pass

    def _detach(self, edit_id: str) -> None:
        pass
