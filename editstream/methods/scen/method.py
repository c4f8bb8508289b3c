"""`scen`: servable SCEN. compute trains an expert and an indexing neuron per fact; apply puts them
in the bank; a query routes each row on its own and the chosen expert acts in the expert layer's FFN.

Per edit, the prompt and `variants` prefixed copies of it are run once up to the expert layer
(captured), and the expert is trained on prompt -> target from there upward only. The neuron reads
the FFN input of a lower routing layer (centred on general text, normalised), keyed on the
subject's last token: states there carry the subject wherever it stands in the prompt, so a
rephrased question still fires it while the same question about another subject does not (measured
on CounterFact: see bench/README.md). It is trained against a bounded set of negatives: general
prompts, the prompt with other subjects swapped in, and the nearest earlier facts' keys, so the cost
of an edit does not grow with history (max_negatives=0, the published form, trains against all).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from editstream.artifacts import Artifact
from editstream.config import config_from_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.methods.base import EditMethod, QueryPlan
from editstream.methods.scen.bank import ExpertBank
from editstream.methods.scen.config import ScenConfig
from editstream.methods.scen.expert import expert_output, new_expert, normalize, prototype_neuron, train_neuron
from editstream.methods.scen.layers import LayerInput, capture_layer_input, decoder_layers, mlp_input, run_from
from editstream.metrics import PairBatch, encode_pairs
from editstream.models import LoadedLM
from editstream.probes import GENERAL_PROMPTS, PREFIXES, SUBJECTS

log = logging.getLogger(__name__)

NEURON_KEYS = ("neuron_w", "neuron_b", "key")


class Scen(EditMethod):
    """Per-fact experts on one FFN, each behind an indexing neuron."""

    name = "scen"

    def __init__(self, lm: LoadedLM, config: ScenConfig) -> None:
        super().__init__(lm)
        layers = decoder_layers(lm.model)
        n = len(layers)
        self.layer = config.layer if config.layer >= 0 else (2 * n) // 3
        self.route_layer = config.route_layer if config.route_layer >= 0 else n // 5
        if not 0 <= self.route_layer <= self.layer < n:
            raise ConfigError(
                f"scen needs 0 <= route_layer ({self.route_layer}) <= layer ({self.layer}) < {n} (the model's layers)"
            )
        if config.expert != "narrow" and not hasattr(layers[self.layer].mlp, "gate_proj"):
            raise ConfigError(f"scen expert={config.expert!r} needs a gated (Llama-family) FFN; use 'narrow'")
        self.config = config
        self.mlp, self.route_mlp = layers[self.layer].mlp, layers[self.route_layer].mlp
        self.bank = ExpertBank(config.expert, self.mlp, config.width, config.capacity, lm.device, torch.float32)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()  # earlier facts' keys (negatives)
        general = self._route_features(GENERAL_PROMPTS, every_token=config.route_on == "subject")
        self.bank.center = general.mean(0)
        self._general = general

    @classmethod
    def build(cls, lm: LoadedLM, **options: Any) -> Scen:
        return cls(lm, config_from_dict(ScenConfig, options))

    # --- features ------------------------------------------------------------------------------
    def _capture(self, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> LayerInput:
        return capture_layer_input(self.lm.model, layer, ids.to(self.lm.device), mask.to(self.lm.device))

    def _route_features(self, prompts: Sequence[str], every_token: bool = False) -> torch.Tensor:
        """Routing-layer FFN inputs at each prompt's last token (or at every token), (N, d)."""
        tok, out = self.lm.tokenizer, []
        for i in range(0, len(prompts), 64):
            enc = tok(list(prompts[i : i + 64]), return_tensors="pt", padding=True, add_special_tokens=False)
            inp = self._capture(self.route_layer, enc["input_ids"], enc["attention_mask"])
            x = mlp_input(self.lm.model, self.route_layer, inp)
            if every_token:  # all but each prompt's first token (an attention sink, alike for every prompt)
                mask = enc["attention_mask"].bool().to(x.device)
                out.append(x[mask & (mask.cumsum(1) > 1)])
            else:
                out.append(x[:, -1])  # left-padded: the last token
        return torch.cat(out).float()

    def _anchor(self, edit: EditRequest, contexts: list[str], batch: PairBatch) -> torch.Tensor:
        """Per row, the position the neuron keys on: the subject's last token if the prompt names it
        (and route_on is "subject") after the first token, else the prompt's last token."""
        tok = self.lm.tokenizer
        out = []
        for ctx, start in zip(contexts, batch.answer_start, strict=True):
            n = len(tok(ctx, add_special_tokens=False)["input_ids"])
            pos = n - 1
            if self.config.route_on == "subject" and edit.subject and edit.subject in ctx:
                head = ctx[: ctx.rindex(edit.subject) + len(edit.subject)]
                pos = len(tok(head, add_special_tokens=False)["input_ids"]) - 1
                pos = pos if pos > 0 else n - 1  # the first token's state is an attention sink: not a key
            out.append(start - n + pos)
        return torch.tensor(out, device=self.lm.device)

    def _nearest_earlier(self, key: torch.Tensor, exclude: str) -> torch.Tensor:
        ids = [e for e in self.memory if e != exclude]
        if not ids:
            return key.new_zeros(0, key.shape[-1])
        keys = torch.stack([self.memory[e] for e in ids]).float().to(key.device)
        if self.config.max_negatives and len(ids) > self.config.max_negatives:
            sims = normalize(keys - self.bank.center) @ normalize(key - self.bank.center)
            keys = keys[sims.topk(self.config.max_negatives).indices]
        return keys

    def _variants(self, edit: EditRequest) -> list[str]:
        rng = random.Random(edit.edit_id)
        prefixes = rng.sample(PREFIXES, k=min(self.config.variants, len(PREFIXES)))
        return [edit.prompt] + [f"{p} {edit.prompt}" for p in prefixes]

    def _swaps(self, edit: EditRequest) -> list[str]:
        if not edit.subject or edit.subject not in edit.prompt or not self.config.subject_swaps:
            return []
        rng = random.Random(edit.edit_id + "/swap")
        others = [s for s in SUBJECTS if s != edit.subject]
        return [edit.prompt.replace(edit.subject, s) for s in rng.sample(others, k=self.config.subject_swaps)]

    def _active(self, span: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Where the expert acts: (B, T) from positions `span` (1, T) and per-row `anchor` (B,)."""
        return span == anchor[:, None] if self.config.act == "anchor" else span >= anchor[:, None]

    # --- the contract --------------------------------------------------------------------------
    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        out = []
        with torch.enable_grad():
            for edit in edits:
                out.append(self._compute_one(edit))
                self.remember(edit.edit_id, out[-1].tensors["key"])
        return out

    def _train_expert(
        self, batch: PairBatch, inp: LayerInput, anchor: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Expert tensors trained on the batch's answers, acting from each row's `anchor` position on
        and running only the expert layer and the ones above it."""
        c, dev = self.config, self.lm.device
        active = self._active(torch.arange(batch.input_ids.shape[1], device=dev)[None, :], anchor)[..., None]
        pairs = zip(batch.answer_start, batch.answer_ids, strict=True)
        pos = torch.cat([torch.arange(s - 1, s - 1 + len(a)) for s, a in pairs])
        rows = torch.cat([torch.full((len(a),), i) for i, a in enumerate(batch.answer_ids)])
        labels = torch.tensor([t for a in batch.answer_ids for t in a], device=dev)
        expert = {k: v.requires_grad_(True) for k, v in new_expert(c.expert, self.mlp, c.width).items()}
        hook = self.mlp.register_forward_hook(
            lambda m, args, base: torch.where(active, expert_output(c.expert, expert, args[0], base, m), base)
        )
        opt = torch.optim.Adam(expert.values(), lr=c.expert_lr)
        steps = 0
        try:
            while steps < c.expert_steps:
                steps += 1
                logits = self.lm.model.lm_head(run_from(self.lm.model, self.layer, inp)[rows, pos])
                loss = F.cross_entropy(logits, labels)
                if loss.item() < 0.05:  # every target token is already the clear argmax
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            hook.remove()
        return {k: v.detach().half() for k, v in expert.items()}, steps

    def _compute_one(self, edit: EditRequest) -> Artifact:
        c = self.config
        contexts = self._variants(edit)
        batch = encode_pairs(self.lm.tokenizer, contexts, [edit.target] * len(contexts))
        anchor = self._anchor(edit, contexts, batch)
        seen: dict[str, torch.Tensor] = {}  # the routing FFN's input, caught on the way up (one forward)
        hook = self.route_mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        try:
            inp = self._capture(self.layer, batch.input_ids, batch.attention_mask)
        finally:
            hook.remove()
        x = seen["x"] if "x" in seen else mlp_input(self.lm.model, self.route_layer, inp)  # route_layer == layer
        expert, steps = self._train_expert(batch, inp, anchor)
        positives = x[torch.arange(len(contexts), device=x.device), anchor].float()
        key = positives[0]
        negatives = [self._general, self._nearest_earlier(key, edit.edit_id)]
        swaps = self._swaps(edit)
        if swaps:
            negatives.append(self._route_features(swaps, every_token=c.route_on == "subject"))
        center = self.bank.center
        fit = (
            prototype_neuron if c.neuron == "prototype" else partial(train_neuron, steps=c.neuron_steps, lr=c.neuron_lr)
        )
        w, b = fit(positives - center, torch.cat(negatives) - center)
        tensors = {**expert, "neuron_w": w.half(), "neuron_b": b.reshape(1).half(), "key": key.half()}
        meta = {"layer": self.layer, "route_layer": self.route_layer, "expert": c.expert, "steps": steps}
        return self.new_artifact(edit, tensors, **meta)

    def remember(self, edit_id: str, key: torch.Tensor) -> None:
        """Keep an earlier fact's key for negative mining (bounded; oldest dropped first)."""
        self.memory[edit_id] = key.float().cpu()
        self.memory.move_to_end(edit_id)
        while len(self.memory) > self.config.memory:
            self.memory.popitem(last=False)

    def _attach(self, artifact: Artifact) -> None:
        m, t = artifact.meta, artifact.tensors
        mine = (self.layer, self.route_layer, self.config.expert)
        if (m.get("layer"), m.get("route_layer"), m.get("expert")) != mine:
            raise ConfigError(
                f"artifact {artifact.edit_id} is a {m.get('expert')} expert at layer {m.get('layer')} routed at "
                f"{m.get('route_layer')}; this scen uses {mine[2]} at layer {mine[0]} routed at {mine[1]}"
            )
        expert = {k: v for k, v in t.items() if k not in NEURON_KEYS}
        self.bank.add(artifact.edit_id, t["neuron_w"].float(), t["neuron_b"].float()[0], expert)
        self.remember(artifact.edit_id, t["key"])

    def _detach(self, edit_id: str) -> None:
        self.bank.remove(edit_id)

    def reset(self) -> None:
        super().reset()
        self.memory.clear()

    # --- serving -------------------------------------------------------------------------------
    @contextmanager
    def query_context(self, prompts: Sequence[str]) -> Iterator[QueryPlan]:
        plan = QueryPlan(list(prompts), [None] * len(prompts))
        if not len(self.bank):
            yield plan
            return
        lengths = torch.tensor([len(self.lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts])
        state: dict[str, Any] = {}

        def capture_mask(_module, _args, kwargs):
            state["mask"] = kwargs.get("attention_mask")

        def route(_module, args):
            if "slots" in state:  # the first (prefill) pass routes; later decode steps reuse it
                return
            x = args[0]
            bsz, width = x.shape[:2]
            mask = state.get("mask")
            pads = (width - mask.sum(1).cpu()) if mask is not None else torch.zeros(bsz, dtype=torch.long)
            last = (pads + lengths - 1).clamp(0, width - 1).to(x.device)
            span = torch.arange(width, device=x.device)[None, :]
            where = span == last[:, None]
            if self.config.route_on == "subject":
                where = (span <= last[:, None]) & (span > pads.to(x.device)[:, None])  # not the first token
            slots, fires, peak = self.bank.route(x, where)
            state.update(slots=slots, fires=fires, active=self._active(span, peak))  # act where it fired
            names = self.bank.slot_edit_ids()
            for i in fires.nonzero().flatten().tolist():
                plan.fired[i] = names[int(slots[i])]

        def apply(_module, args, base):
            rows = state["fires"].nonzero().flatten()
            if not len(rows):
                return base
            x = args[0]
            active = state.pop("active", None)  # positions from the neuron's peak on (prefill only)
            if active is None:  # a decode step: new tokens come after the anchor
                active = torch.full(x.shape[:2], self.config.act == "from_anchor", device=x.device)
            out = base.clone()
            edited = self.bank.output(state["slots"][rows], x[rows], base[rows])
            out[rows] = torch.where(active[rows][..., None], edited.to(base.dtype), base[rows])
            return out

        handles = [
            self.lm.model.register_forward_pre_hook(capture_mask, with_kwargs=True),
            self.route_mlp.register_forward_pre_hook(route),
            self.mlp.register_forward_hook(apply),
        ]
        try:
            yield plan
        finally:
            for h in handles:
                h.remove()
