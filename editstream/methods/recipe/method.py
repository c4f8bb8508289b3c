"""RECIPE as an editstream method.

compute: one batched encoder forward over the edit prompts gives each edit its retrieval key and the
encoding its continuous prompt is generated from (with the target's token embeddings, in our
variant); no LLM pass.
apply: add the key to the faiss index (the base class keeps the packed artifact: key, encoding and
target ids, ~1 KB). query: encode the prompts, search, keep hits that beat the Knowledge Sentinel,
generate those rows' prompts from their encodings and prefix them through a hook that lives only
inside `query_context`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from editstream.artifacts import Artifact, PackedArtifact, stacked
from editstream.edits import EditRequest
from editstream.errors import ArtifactError, ConfigError
from editstream.methods.base import EditMethod, QueryPlan
from editstream.methods.recipe.checkpoint import PACKAGED, load_checkpoint
from editstream.methods.recipe.network import RecipeNet, embed_ids, target_token_ids
from editstream.methods.recipe.relation import RelationGate, load_gate
from editstream.models import LoadedEncoder, LoadedLM, load_encoder
from editstream.prefix import soft_prefix
from editstream.retrieval import DEFAULT_ANN_THRESHOLD, make_index

log = logging.getLogger(__name__)


class RecipeRetrieval:
    """Encoder + trained retriever + key index: the part RECIPE shares with the text-RAG baseline."""

    def __init__(
        self, net: RecipeNet, encoder: LoadedEncoder, gate: RelationGate | None = None, ann_threshold: int = 0
    ) -> None:
        self.net = net
        self.encoder = encoder
        self.gate = gate
        self.index = make_index(net.config.key_dim, next(net.parameters()).device, ann_threshold)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode(list(texts)).to(next(self.net.parameters()).device)

    def keys(self, r: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net.retriever.keys(r)

    def retrieve(
        self,
        prompts: Sequence[str],
        exact: Sequence[str | None] | None = None,
        about: Callable[[str], dict] | None = None,
    ) -> list[str | None]:
        """The edit whose key beats the sentinel for each prompt, or None; `exact` (an edit stored for
        exactly that prompt) wins without a search: the sentinel can reject even an identical prompt.
        With a relation gate and `about` (an edit's artifact meta: prompt, subject), a searched hit
        must also ask the edit's relation."""
        exact = list(exact) if exact is not None else [None] * len(prompts)
        if all(exact) or not len(self.index):
            return exact
        with torch.inference_mode():
            q = self.net.retriever.queries(self.encode(prompts))
            threshold = self.net.retriever.sentinel_score(q).cpu()
        scores, ids = self.index.search(q)
        found = [i if s > t else None for s, t, i in zip(scores.tolist(), threshold.tolist(), ids, strict=True)]
        rows = [r for r, (e, f) in enumerate(zip(exact, found, strict=True)) if f is not None and e is None]
        if self.gate is not None and about is not None and rows:
            agree = self.gate.agree(self.encoder, [prompts[r] for r in rows], [found[r] for r in rows], about)
            for r, ok in zip(rows, agree, strict=True):
                if not ok:
                    found[r] = None
        return [e or f for e, f in zip(exact, found, strict=True)]

    def remove(self, edit_id: str) -> None:
        """Take an edit out of the index (and the gate's cache)."""
        self.index.remove(edit_id)
        if self.gate is not None:
            self.gate.forget(edit_id)


def load_retrieval(
    lm: LoadedLM,
    checkpoint: str | Path | None,
    encoder: LoadedEncoder | None,
    relation_gate: bool = True,
    ann_threshold: int = 0,
    encoder_int8: bool = False,
) -> RecipeRetrieval:
    """The checkpoint's retriever (and its relation gate, if it has one and `relation_gate`); keys in
    an approximate (IVF) index once there are `ann_threshold` of them (0: always exact); the sentence
    encoder quantised to int8 with `encoder_int8` (editors and replicas must agree: artifacts say
    which encoder made their keys, and a replica refuses keys of another)."""
    net, meta = load_checkpoint(checkpoint)
    d_llm = lm.model.get_input_embeddings().weight.shape[1]
    if meta["d_llm"] != d_llm:
        raise ConfigError(f"RECIPE checkpoint makes {meta['d_llm']}-dim prompts; model {lm.name} embeds in {d_llm}")
    if meta.get("llm_fingerprint") not in (None, lm.fingerprint):
        log.warning("RECIPE checkpoint was trained on %s, serving %s", meta.get("llm"), lm.name)
    encoder = encoder or load_encoder(net.config.encoder, device=str(lm.device), int8=encoder_int8)
    gate = load_gate(Path(checkpoint) if checkpoint else PACKAGED, lm.device) if relation_gate else None
    return RecipeRetrieval(net.to(lm.device), encoder, gate, ann_threshold)


class RetrievingMethod(EditMethod):
    """A method that finds edits with RECIPE's retriever (and relation gate)."""

    def __init__(self, lm: LoadedLM, retrieval: RecipeRetrieval) -> None:
        super().__init__(lm)
        self.retrieval = retrieval

    def derived_state(self) -> dict[str, torch.Tensor]:
        """The key index's training (IVF centroids), so a loaded state's index skips its k-means."""
        return self.retrieval.index.training()

    def seed_derived(self, tensors: dict[str, torch.Tensor]) -> None:
        self.retrieval.index.seed(tensors)

    @classmethod
    def build(
        cls,
        lm: LoadedLM,
        checkpoint: str | Path | None = None,
        encoder: LoadedEncoder | None = None,
        relation_gate: bool = True,
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        encoder_int8: bool = False,
    ) -> RetrievingMethod:
        if isinstance(ann_threshold, bool) or not isinstance(ann_threshold, int) or ann_threshold < 0:
            raise ConfigError(
                f"ann_threshold {ann_threshold!r}: expected a whole number of keys >= 0 (0: always exact search)"
            )
        if not isinstance(encoder_int8, bool):
            raise ConfigError(f"encoder_int8 {encoder_int8!r}: expected true or false")
        if encoder is not None and encoder_int8 and "+int8" not in encoder.name:
            raise ConfigError(f"encoder_int8=true, but the encoder passed in is {encoder.name!r}")
        return cls(lm, load_retrieval(lm, checkpoint, encoder, relation_gate, ann_threshold, encoder_int8))

    def new_artifact(self, edit: EditRequest, tensors: dict, **meta: Any) -> Artifact:
        """Also records which encoder made the key, so a replica that encodes queries otherwise refuses it."""
        return super().new_artifact(edit, tensors, key_encoder=self.retrieval.encoder.name, **meta)

    def check(self, artifact: Artifact | PackedArtifact) -> None:
        super().check(artifact)
        made_by = artifact.get("key_encoder", self.retrieval.net.config.encoder)  # older artifacts: float32
        if made_by != self.retrieval.encoder.name:
            raise ArtifactError(
                f"artifact {artifact.edit_id} has a key made by encoder {made_by!r}; this replica encodes queries "
                f"with {self.retrieval.encoder.name!r} (the encoder_int8 option must be the same everywhere)"
            )


class Recipe(RetrievingMethod):
    """Lifelong editing by retrieved continuous prompts; the LLM's weights are never touched."""

    name = "recipe"
    plan_only = True
    decode_reads_state = False

    def __init__(self, lm: LoadedLM, retrieval: RecipeRetrieval) -> None:
        super().__init__(lm, retrieval)
        self.net = retrieval.net

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        """Per edit its key, the generator's input encoding (float16) and, for checkpoints that read
        them, the target's token ids; the prompt vectors are generated from these when the edit
        fires (a 384-dim encoding is 768 bytes, the 3 x 576 vectors 3,456)."""
        if not edits:
            return []
        config = self.net.config
        r_prompt = self.retrieval.encode([e.prompt for e in edits])
        with torch.inference_mode():
            keys = self.net.retriever.keys(r_prompt)
        encodings = r_prompt if config.uses_target_embeddings else self.retrieval.encode([e.statement for e in edits])
        ids = None
        if config.uses_target_embeddings:
            ids = target_token_ids(self.lm.tokenizer, [e.target for e in edits], config.target_slots)
        out = []
        for row, (e, k, r) in enumerate(zip(edits, keys, encodings, strict=True)):
            tensors = {"key": k.half(), "encoding": r.half()}
            if ids is not None:
                tensors["target_ids"] = ids[row].to(torch.int32)
            out.append(self.new_artifact(e, tensors))
        return out

    def _attach(self, artifact: Artifact) -> None:
        self._check_tensors(artifact.edit_id, {name: tuple(t.shape) for name, t in artifact.tensors.items()}.get)
        self.retrieval.index.add(artifact.edit_id, artifact.tensors["key"])

    def _attach_many(self, packed: Sequence[PackedArtifact]) -> None:
        for p in {p.kind: p for p in packed}.values():  # artifacts of one kind share their shapes
            self._check_tensors(p.edit_id, p.shape)
        if packed:
            self.retrieval.index.add_many([p.edit_id for p in packed], stacked(packed, "key"))

    def _check_tensors(self, edit_id: str, shape: Callable[[str], tuple[int, ...] | None]) -> None:
        """ArtifactError/ConfigError unless an artifact's tensors (`shape(name)`: None if absent) fit."""
        config = self.net.config
        if shape("prompt") is not None and shape("encoding") is None:
            raise ArtifactError(
                f"artifact {edit_id} holds prompt vectors, the RECIPE artifact form before 2026-12-01; "
                "this replica generates them from the encoding when the edit fires: recompute the edit"
            )
        enc_dim = self.retrieval.encoder.dim
        if shape("encoding") != (enc_dim,) or shape("key") != (config.key_dim,):
            raise ConfigError(
                f"artifact {edit_id}: encoding {shape('encoding')} / key {shape('key')}, "
                f"expected ({enc_dim},) / ({config.key_dim},)"
            )
        if config.uses_target_embeddings and shape("target_ids") is None:
            raise ConfigError(f"artifact {edit_id} lacks target_ids, which this checkpoint needs")

    def _detach(self, edit_id: str) -> None:
        self.retrieval.remove(edit_id)

    def _prefix(self, edit_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix vectors and mask of fired edits, generated from their kept encodings."""
        packed = [self._applied[e] for e in edit_ids]
        device, embed = self.lm.device, self.lm.model.get_input_embeddings()
        encodings = torch.stack([p.tensor("encoding") for p in packed]).to(device).float()
        targets = None
        if self.net.config.uses_target_embeddings:
            targets = embed_ids(embed, torch.stack([p.tensor("target_ids") for p in packed]))
        with torch.inference_mode():
            generated = self.net.generator(encodings, targets)
            return self.net.generator.prefix(generated, targets if self.net.generator.appends_targets else None)

    @contextmanager
    def query_context(self, prompts: Sequence[str]) -> Iterator[QueryPlan]:
        fired = self.retrieval.retrieve(prompts, self.exact_edits(prompts), self.meta_of)
        plan = QueryPlan(list(prompts), fired)
        rows = [i for i, f in enumerate(fired) if f is not None]
        if not rows:
            yield plan
            return
        device = self.lm.device
        hit_prefix, hit_mask = self._prefix([fired[i] for i in rows])
        prefix = torch.zeros(len(prompts), *hit_prefix.shape[1:], device=device)
        prefix_mask = torch.zeros(len(prompts), hit_prefix.shape[1], dtype=torch.long, device=device)
        prefix[rows] = hit_prefix
        prefix_mask[rows] = hit_mask
        used = prefix_mask.any(dim=0)  # slots no row uses (short targets) are dropped: an all-ones
        prefix, prefix_mask = prefix[:, used], prefix_mask[:, used]  # mask keeps attention on its fast path
        with soft_prefix(self.lm.model, prefix, prefix_mask) as prefix_rows:
            plan.select_rows = prefix_rows.select
            plan.set_offsets = lambda offsets: setattr(prefix_rows, "offsets", offsets)
            yield plan
