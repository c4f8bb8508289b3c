"""`scen`: servable SCEN. compute trains an expert and an indexing neuron per fact; apply puts them
in the bank; a query routes each row on its own and the chosen expert acts in the expert layer's FFN.

Per edit, the prompt and `variants` prefixed copies of it (and a question also as the user turn of
the chat template) are run once up to the expert layer (captured), and the expert is trained on
prompt -> target from there upward only. In the chat form the routing reads the question's own
tokens behind the template's head. The neuron reads
the FFN input of a lower routing layer (routing.py): the mean of the token features over the
subject's span, which a rephrased question about the same subject reproduces while the same
question about another subject, even one sharing the last name, does not (measured on CounterFact
train rows; README, SCEN). It is fitted against a bounded set of negatives: general text,
the prompt with other subjects swapped in, and the nearest earlier facts' keys, so the cost of an
edit does not grow with history (max_negatives=0, the published form, uses all earlier facts).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from editstream.artifacts import Artifact
from editstream.config import config_from_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.generation import chat_text
from editstream.methods.base import EditMethod, QueryPlan
from editstream.methods.recipe.checkpoint import PACKAGED
from editstream.methods.recipe.relation import RelationGate, load_gate
from editstream.methods.scen.bank import ExpertBank
from editstream.methods.scen.config import ScenConfig
from editstream.methods.scen.expert import expert_output, new_expert
from editstream.methods.scen.layers import LayerInput, capture_layer_input, decoder_layers, mlp_input, run_from
from editstream.methods.scen.neuron import EarlierFacts, Neuron, fit_neuron, logistic_neuron, prototype_neuron
from editstream.methods.scen.routing import Centers, Window, WindowSums, offsets, token_features, windows_at
from editstream.metrics import PairBatch, encode_pairs
from editstream.models import LoadedEncoder, LoadedLM, load_encoder
from editstream.probes import GENERAL_PROMPTS, PREFIXES, SUBJECT_CONTEXTS, SUBJECTS

log = logging.getLogger(__name__)

NEURON_KEYS = ("neuron_w", "neuron_b")


class Scen(EditMethod):
    """Per-fact experts on one FFN, each behind an indexing neuron."""

    name = "scen"
    plan_only = True
    editor_batch = 1  # about a second per fact: parallel editors take one fact at a time

    def __init__(
        self, lm: LoadedLM, config: ScenConfig, gate: RelationGate | None = None, encoder: LoadedEncoder | None = None
    ) -> None:
        super().__init__(lm)
        if gate is not None and encoder is None:
            raise ConfigError("scen: a relation gate needs the sentence encoder it was trained with")
        self.gate, self.encoder = gate, encoder
        layers = decoder_layers(lm.model)
        n = len(layers)
        self.layer = config.layer if config.layer >= 0 else (7 * n) // 8
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
        self.earlier = EarlierFacts(config.memory)  # earlier facts' prototypes (negatives)
        x, mask = self._route_inputs(GENERAL_PROMPTS)
        self.centers = Centers.fit(x, mask)
        self._general_sums = WindowSums(token_features(x, self.centers, mask), config.max_window)
        self._general_mask = mask
        self._general: dict[Window, torch.Tensor] = {}  # general-text windows (negatives), by window

    @classmethod
    def build(cls, lm: LoadedLM, encoder: LoadedEncoder | None = None, **options: Any) -> Scen:
        config = config_from_dict(ScenConfig, options)
        if not config.relation_gate:
            return cls(lm, config)
        gate = load_gate(PACKAGED, lm.device)
        if gate is None:
            raise ConfigError(f"scen relation_gate=true, but {PACKAGED} holds no relation gate")
        encoder = encoder or load_encoder(gate.info.get("encoder", "minilm"), device=str(lm.device))
        return cls(lm, config, gate, encoder)

    # --- features ------------------------------------------------------------------------------
    def _capture(self, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> LayerInput:
        return capture_layer_input(self.lm.model, layer, ids.to(self.lm.device), mask.to(self.lm.device))

    def _route_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing layer's FFN inputs (N, T, d) for plain prompts (left-padded) and their attention mask."""
        enc = self.lm.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        inp = self._capture(self.route_layer, enc["input_ids"], enc["attention_mask"])
        return mlp_input(self.lm.model, self.route_layer, inp), enc["attention_mask"].to(self.lm.device)

    def _general_windows(self, window: Window) -> torch.Tensor:
        if window not in self._general:
            self._general[window] = windows_at(self._general_sums, self._general_mask, window)
        return self._general[window]

    def _count(self, text: str) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _anchors(self, edit: EditRequest, contexts: list[str], batch: PairBatch) -> tuple[torch.Tensor, list[int]]:
        """Per row, the batch position the neuron keys on and the window length there: the subject's
        last token and its length in tokens where the context names the subject (and route_on is
        "subject"), else the context's last token and 1. A length of 0 marks a context that starts
        with the subject (its tokens differ there: "Ireland" starts a text as I-re-land)."""
        out, lengths = [], []
        for ctx, start in zip(contexts, batch.answer_start, strict=True):
            n = self._count(ctx)
            pos, length = n - 1, 1
            if self._subject_routed(edit):
                at = ctx.rindex(edit.subject)
                pos = self._count(ctx[: at + len(edit.subject)]) - 1
                before = self._count(ctx[:at].rstrip())
                length = min(pos + 1 - before, self.config.max_window) if before else 0
            out.append(start - n + pos)
            lengths.append(length)
        return torch.tensor(out, device=self.lm.device), lengths

    def _subject_routed(self, edit: EditRequest) -> bool:
        return self.config.route_on == "subject" and bool(edit.subject) and edit.subject in edit.prompt

    def _variants(self, edit: EditRequest) -> list[str]:
        rng = random.Random(edit.edit_id)
        prefixes = rng.sample(PREFIXES, k=min(self.config.variants, len(PREFIXES)))
        contexts = [edit.prompt] + [f"{p} {edit.prompt}" for p in prefixes]
        if self.config.chat_variant and edit.is_question and getattr(self.lm.tokenizer, "chat_template", None):
            contexts.append(chat_text(self.lm, edit.prompt))  # the question as a chat's user turn, answered
        return contexts

    def _swaps(self, edit: EditRequest) -> list[str]:
        """The prompt with other subjects in place of the edit's: same relation, another subject."""
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
                artifact, neuron = self._compute_one(edit)
                self.earlier.remember(edit.edit_id, neuron.prototypes())
                out.append(artifact)
        return out

    def _train_expert(
        self, batch: PairBatch, inp: LayerInput, anchor: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Expert tensors trained on the batch's answers, acting at each row's `anchor` (or from it on)
        and running only the expert layer and the ones above it. Every row's last position (the word
        after the target, weighted by after_weight, or after a row with no answer, another context of
        the subject, by keep_weight) is held to the unedited model's prediction there by a KL term;
        the first step, with the expert still a zero change, gives that prediction."""
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
        kept = torch.tensor([c.after_weight if a else c.keep_weight for a in batch.answer_ids], device=dev)
        steps, unedited = 0, None
        try:
            while steps < c.expert_steps:
                steps += 1
                hidden = run_from(self.lm.model, self.layer, inp)
                loss = F.cross_entropy(self.lm.model.lm_head(hidden[rows, pos]), labels)
                if loss.item() < c.stop_loss:  # every target token is already the clear argmax
                    break
                if kept.any():
                    last = F.log_softmax(self.lm.model.lm_head(hidden[:, -1]).float(), dim=-1)
                    unedited = last.detach() if unedited is None else unedited
                    kl = F.kl_div(last, unedited, log_target=True, reduction="none").sum(-1)
                    loss = loss + (kept * kl).sum() / len(kl)
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            hook.remove()
        return {k: v.detach().half() for k, v in expert.items()}, steps

    def _keep(self, edit: EditRequest) -> list[str]:
        """Other contexts of the edit's subject, whose next word the expert must leave as it was."""
        if not self.config.keep_weight or not self._subject_routed(edit):
            return []
        return [t.format(edit.subject) for t in SUBJECT_CONTEXTS]

    def _compute_one(self, edit: EditRequest) -> tuple[Artifact, Neuron]:
        c = self.config
        contexts, keep = self._variants(edit), self._keep(edit)
        texts = contexts + keep
        batch = encode_pairs(self.lm.tokenizer, texts, [edit.target] * len(contexts) + [""] * len(keep))
        anchor, lengths = self._anchors(edit, texts, batch)
        seen: dict[str, torch.Tensor] = {}  # the routing FFN's input, caught on the way up (one forward)
        hook = self.route_mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        try:
            inp = self._capture(self.layer, batch.input_ids, batch.attention_mask)
        finally:
            hook.remove()
        x = seen["x"] if "x" in seen else mlp_input(self.lm.model, self.route_layer, inp)  # route_layer == layer
        expert, steps = self._train_expert(batch, inp, anchor)
        n = len(contexts)  # the neuron's positives come from the prompt's contexts, not the kept ones
        sums = WindowSums(token_features(x[:n], self.centers, batch.attention_mask[:n].to(x.device)), c.max_window)
        neuron = self._neuron(edit, sums, anchor[:n], lengths[:n])
        tensors = {**expert, "neuron_w": neuron.weights.half(), "neuron_b": neuron.biases.half()}
        meta = {"layer": self.layer, "route_layer": self.route_layer, "expert": c.expert}
        artifact = self.new_artifact(edit, tensors, steps=steps, windows=neuron.windows_meta(), **meta)
        return artifact, neuron

    def _neuron(self, edit: EditRequest, sums: WindowSums, anchor: torch.Tensor, lengths: list[int]) -> Neuron:
        """The edit's indexing neuron. Routed on the subject, it has two prototypes: the subject as it
        starts a text (the states of a text's first tokens depend on those tokens alone, so the
        positive is the subject by itself) and inside a text (the contexts that do not start with
        it). Negatives: general text, the prompt with other subjects, the nearest earlier facts."""
        c = self.config
        forms: list[tuple[torch.Tensor, Window]] = []  # (positives (P, d), window) per prototype
        inside = [i for i, n in enumerate(lengths) if n > 0]
        if inside:
            window = Window(lengths[inside[0]])
            forms.append((sums(window.length)[inside, anchor[inside]], window))
        swaps, routed = self._swaps(edit), self._subject_routed(edit)
        texts = [edit.subject] * routed + swaps
        if texts:
            x, mask = self._route_inputs(texts)
            others = WindowSums(token_features(x, self.centers, mask), c.max_window)
            row = torch.arange(len(texts), device=mask.device)[:, None]
        if routed:  # the subject's first max_window tokens, as a text's first tokens
            start = Window(min(self._count(edit.subject), c.max_window), start=True)
            forms.insert(0, (windows_at(others, mask * (row == 0), start), start))
        means = torch.stack([F.normalize(p.mean(0), dim=-1) for p, _ in forms])
        earlier = self.earlier.nearest(means, edit.edit_id, c.max_negatives)

        def negatives(window: Window) -> torch.Tensor:
            found = [self._general_windows(window), earlier]
            if swaps:
                found.append(windows_at(others, mask * (row >= routed), window))
            return torch.cat(found)

        def fit(positives: torch.Tensor, negatives: torch.Tensor, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
            if c.neuron == "logistic":
                return logistic_neuron(positives, negatives, steps=c.neuron_steps, lr=c.neuron_lr)
            return prototype_neuron(positives, negatives, c.start_similarity if window.start else c.min_similarity)

        return fit_neuron(forms, negatives, fit)

    def _attach(self, artifact: Artifact) -> None:
        m, t = artifact.meta, artifact.tensors
        mine = (self.layer, self.route_layer, self.config.expert)
        if (m.get("layer"), m.get("route_layer"), m.get("expert")) != mine:
            raise ConfigError(
                f"artifact {artifact.edit_id} is a {m.get('expert')} expert at layer {m.get('layer')} routed at "
                f"{m.get('route_layer')}; this scen uses {mine[2]} at layer {mine[0]} routed at {mine[1]}"
            )
        neuron = Neuron.from_tensors(
            artifact.edit_id, t["neuron_w"], t["neuron_b"], m.get("windows"), self.config.max_window
        )
        expert = {k: v for k, v in t.items() if k not in NEURON_KEYS}
        # not remembered as a negative: only `compute` mines negatives, and a replica never computes
        # (100,000 remembered prototypes would be ~460 MB a replica never reads)
        self.bank.add(artifact.edit_id, neuron.weights, neuron.biases, neuron.windows, expert)

    def _detach(self, edit_id: str) -> None:
        self.bank.remove(edit_id)
        if self.gate is not None:
            self.gate.forget(edit_id)

    def _gated(self, prompts: Sequence[str], slots: torch.Tensor, fires: torch.Tensor) -> torch.Tensor:
        """`fires` without the rows whose prompt, its subject masked, does not ask what the fired
        edit's prompt asks (the relation gate; rows where the gate cannot tell keep their expert)."""
        rows = fires.nonzero().flatten().tolist()
        if self.gate is None or not rows:
            return fires
        names = self.bank.slot_edit_ids()
        fired = [names[int(slots[i])] for i in rows]
        agree = self.gate.agree(self.encoder, [prompts[i] for i in rows], fired, self.meta_of)
        kept = fires.clone()
        for i, ok in zip(rows, agree, strict=True):
            kept[i] = ok
        return kept

    def reset(self) -> None:
        super().reset()
        self.earlier.clear()

    # --- serving -------------------------------------------------------------------------------
    @contextmanager
    def query_context(self, prompts: Sequence[str]) -> Iterator[QueryPlan]:
        plan = QueryPlan(list(prompts), [None] * len(prompts))
        if not len(self.bank):
            yield plan
            return
        plan.shrinkable = False  # the routing below is per row of the batch it first saw
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
            mask = mask.to(x.device) if mask is not None else torch.ones(bsz, width, device=x.device)
            first = width - mask.sum(1)  # left padding, then a chat template's head (if any), then the prompt
            if "heads" in state:
                first = first + state["heads"].to(x.device)
            last = (first + lengths.to(x.device) - 1).clamp(0, width - 1)
            span = torch.arange(width, device=x.device)[None, :]
            # the prompt's own tokens: not the template around it, not what follows it
            prompt = mask.bool() & (span >= first[:, None]) & (span <= last[:, None])
            sums = WindowSums(token_features(x, self.centers, prompt), self.config.max_window)
            where = prompt if self.config.route_on == "subject" else span == last[:, None]
            slots, fires, peak = self.bank.route(sums, where, offsets(prompt))
            fires = self._gated(prompts, slots, fires)
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

        plan.set_offsets = lambda heads: state.update(heads=heads)  # chat: tokens before each row's prompt
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
