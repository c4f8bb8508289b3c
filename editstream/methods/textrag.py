"""`text-rag`: the baseline users would reach for. The same retriever as RECIPE finds the edit;
its statement is prepended as text ("Fact: ...") to the prompt."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from editstream.artifacts import Artifact
from editstream.edits import EditRequest
from editstream.methods.base import QueryPlan
from editstream.methods.recipe.method import RecipeRetrieval, RetrievingMethod
from editstream.models import LoadedLM

TEMPLATE = "Fact: {statement}.\n"


class TextRAG(RetrievingMethod):
    """Retrieve by the prompt, then show the model the stored fact as plain text."""

    name = "text-rag"
    plan_only = True
    decode_reads_state = False

    def __init__(self, lm: LoadedLM, retrieval: RecipeRetrieval) -> None:
        super().__init__(lm, retrieval)
        self._statements: dict[str, str] = {}

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        if not edits:
            return []
        keys = self.retrieval.keys(self.retrieval.encode([e.prompt for e in edits]))
        return [self.new_artifact(e, {"key": k.half()}) for e, k in zip(edits, keys, strict=True)]

    def _attach(self, artifact: Artifact) -> None:
        self.retrieval.index.add(artifact.edit_id, artifact.tensors["key"])
        self._statements[artifact.edit_id] = f"{artifact.meta['prompt']} {artifact.meta['target']}"

    def _detach(self, edit_id: str) -> None:
        self.retrieval.remove(edit_id)
        self._statements.pop(edit_id, None)

    @contextmanager
    def query_context(self, prompts: Sequence[str]) -> Iterator[QueryPlan]:
        fired = self.retrieval.retrieve(prompts, self.exact_edits(prompts), self.meta_of)
        texts = [
            TEMPLATE.format(statement=self._statements[f]) + p if f else p for p, f in zip(prompts, fired, strict=True)
        ]
        yield QueryPlan(texts, fired)
