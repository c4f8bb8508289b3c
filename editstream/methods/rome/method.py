"""`rome` and `memit`: locate-then-edit weight changes to MLP output matrices.

ROME (Meng et al. 2022) rewrites one layer: the key k* is the MLP-output matrix's input at the
subject's last token (averaged over the prompt behind a few unrelated prefixes), the value v* is
the MLP output plus a vector delta optimised so the model predicts the new target (with a KL term
keeping "<subject> is a" unchanged and a norm penalty), and the rank-one update
dW = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*) makes W k* = v*, where C = E[k k^T] over a corpus
(`stats.py`). MEMIT (Meng et al. 2023) spreads a batch of edits over a range of layers: it
optimises target hidden states z at the last layer of the range, then at each layer solves
dW = R K^T (lambda C + K K^T)^-1 for the remaining residual R (shared out over the layers left).

Artifacts are the factors of the change: per edited layer one vector u (d_model) and one v (d_ff)
per edit (MEMIT's joint solve splits exactly into per-edit rank-one terms), float32, so every
replica adds the same change and `remove` subtracts it. Both are `sequential`: each edit is
solved on the model with the earlier ones applied, so one editor computes them in order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from editstream.artifacts import Artifact
from editstream.config import config_from_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.methods.rome.stats import DEFAULT_CORPUS, second_moments
from editstream.methods.rome.weights import (
    WeightEdit,
    delta,
    key_module,
    output_of,
    param_name,
    temporarily_added,
)
from editstream.methods.scen.layers import _Stop, capture_layer_input, decoder_layers, positions, run_from
from editstream.metrics import encode_pairs
from editstream.models import LoadedLM
from editstream.probes import PREFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RomeConfig:
    layers: tuple[int, ...] = ()  # () = the default: ROME one layer at n/6, MEMIT five layers ending there + 1
    contexts: int = 2  # prompt copies behind unrelated prefixes, besides the bare prompt
    steps: int = 20  # Adam steps optimising the target delta
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0  # |delta| <= clamp_norm * |original value|
    stop_loss: float = 0.05  # stop optimising once the target NLL is below this
    mom2_weight: float = 1500.0  # MEMIT's lambda on C (ROME uses C alone)
    mom2_samples: int = 100_000  # corpus tokens for C
    mom2_corpus: str = DEFAULT_CORPUS
    regularise: float = 1e-4  # ROME: C + regularise * mean(diag C) * I before solving
    batch: int = 64  # MEMIT: most edits solved jointly
    key: str = "prompt"  # k*: "prompt" (the prompt itself) or "mean" (also behind the prefixes, as published)


class LocateEdit(WeightEdit):
    """Shared by ROME and MEMIT: keys, target values, covariance, and adding/removing the factors."""

    sequential = True

    def __init__(self, lm: LoadedLM, config: RomeConfig) -> None:
        super().__init__(lm)
        n = len(decoder_layers(lm.model))
        layers = list(config.layers) or self.default_layers(n)
        for layer in layers:
            key_module(lm.model, layer)  # validates the index and the architecture
        self.config, self.layers = config, layers
        self.modules = [key_module(lm.model, layer) for layer in layers]
        self.params = [param_name(lm.model, layer) for layer in layers]
        self._mom2: dict[int, torch.Tensor] | None = None

    @classmethod
    def build(cls, lm: LoadedLM, **options) -> LocateEdit:
        return cls(lm, config_from_dict(RomeConfig, options))

    def default_layers(self, n: int) -> list[int]:
        raise NotImplementedError

    @property
    def mom2(self) -> dict[int, torch.Tensor]:
        if self._mom2 is None:  # loaded (or measured) on the first edit, not when a replica starts
            c = self.config
            self._mom2 = second_moments(self.lm, self.layers, c.mom2_corpus, c.mom2_samples)
        return self._mom2

    # --- keys and values -------------------------------------------------------------------------
    def _contexts(self, edit: EditRequest) -> list[str]:
        return [edit.prompt] + [f"{p} {edit.prompt}" for p in PREFIXES[: self.config.contexts]]

    def _subject_index(self, text: str, subject: str | None) -> int:
        """Index, among `text`'s own tokens, of the subject's last token (else of the last token);
        never 0, whose state is an attention sink on this model family."""
        tok = self.lm.tokenizer
        if subject and subject in text:
            head = text[: text.rindex(subject) + len(subject)]
            return max(1, len(tok(head, add_special_tokens=False)["input_ids"]) - 1)
        return len(tok(text, add_special_tokens=False)["input_ids"]) - 1

    def _key_contexts(self, edit: EditRequest) -> list[str]:
        """Where k* is read: the prompt itself ("prompt"), or also behind the prefixes ("mean", as published;
        on SmolLM2 a subject at the start of a prompt reads very differently behind a prefix)."""
        return [edit.prompt] if self.config.key == "prompt" else self._contexts(edit)

    def _keys(self, layer: int, contexts: list[str], subject: str | None) -> torch.Tensor:
        """Mean key (d_ff) at the subject's last token over `contexts`."""
        return self._batch_keys(layer, [(contexts, subject)])[0]

    def _batch_keys(self, layer: int, groups: list[tuple[list[str], str | None]]) -> torch.Tensor:
        """Per (contexts, subject) group, the mean key at the subject's last token; one forward, (n, d_ff)."""
        texts = [c for contexts, _ in groups for c in contexts]
        subjects = [s for contexts, s in groups for _ in contexts]
        ids, mask, pos = self._left_padded(texts, subjects)
        box: dict[str, torch.Tensor] = {}

        def hook(_module, args):
            box["k"] = args[0][torch.arange(len(texts)), pos].float()
            raise _Stop

        handle = key_module(self.lm.model, layer).register_forward_pre_hook(hook)
        try:
            with torch.no_grad(), contextlib.suppress(_Stop):
                self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        finally:
            handle.remove()
        owner = torch.tensor([g for g, (contexts, _) in enumerate(groups) for _ in contexts], device=box["k"].device)
        sums = torch.zeros(len(groups), box["k"].shape[1], device=box["k"].device).index_add(0, owner, box["k"])
        return sums / torch.bincount(owner, minlength=len(groups))[:, None]

    def _left_padded(self, texts: list[str], subjects: list[str | None]):
        """Token ids, mask and the subject's last-token index per row, left-padded, on the model's device."""
        tok = self.lm.tokenizer
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        pos = [width - len(r) + self._subject_index(t, s) for t, s, r in zip(texts, subjects, rows, strict=True)]
        dev = self.lm.device
        return ids.to(dev), mask.to(dev), torch.tensor(pos, device=dev)

    def _target_delta(self, layer: int, edits: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per edit, the vector added to layer `layer`'s output at the subject's last token that
        makes the model say the target, and that output's original value on the bare prompt; both
        (n, d_model). All edits are optimised in one batch (separable losses); lower layers run once."""
        c, model, dev, tok = self.config, self.lm.model, self.lm.device, self.lm.tokenizer
        texts, answers, owner, subjects, bare_rows = [], [], [], [], []
        for n, e in enumerate(edits):
            subject = e.subject if e.subject and e.subject in e.prompt else None
            contexts = self._contexts(e)
            bare_rows.append(len(texts))
            texts += contexts
            answers += [e.target] * len(contexts)
            owner += [n] * len(contexts)
            subjects += [subject] * len(contexts)
        n_rw = len(texts)
        for n, e in enumerate(edits):  # one "<subject> is a" row per edit, after all rewrite rows
            subject = subjects[bare_rows[n]]
            subjects.append(subject)
            texts.append(f"{subject} is a" if subject else e.prompt)
            answers.append("x")
        kl_rows = [n_rw + n for n in range(len(edits))]
        batch = encode_pairs(tok, texts, answers)
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        pos_list = []
        for text, answer, subject in zip(texts, batch.answer_ids, subjects, strict=True):
            length = len(tok(text, add_special_tokens=False)["input_ids"])
            pos_list.append(ids.shape[1] - len(answer) - length + self._subject_index(text, subject))
        pos = torch.tensor(pos_list, device=dev)
        row_owner = torch.tensor(owner + list(range(len(edits))), device=dev)
        inp = capture_layer_input(model, layer, ids, mask)
        rows = torch.arange(len(texts), device=dev)
        d = torch.zeros(len(edits), model.config.hidden_size, device=dev, requires_grad=True)
        block = decoder_layers(model)[layer]
        box: dict[str, torch.Tensor] = {}

        def add_delta(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            box.setdefault("orig", h[torch.tensor(bare_rows, device=dev), pos[bare_rows]].detach().float())
            h = h.clone()
            h[rows, pos] = h[rows, pos] + d[row_owner].to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(add_delta)
        targets = [torch.tensor(a, device=dev) for a in batch.answer_ids[:n_rw]]
        starts = batch.answer_start
        off = min(starts) - 1  # answers are right-aligned: only the last positions need logits
        kl_idx = torch.tensor([starts[r] - 1 - off for r in kl_rows], device=dev)
        kl_sel = torch.tensor(kl_rows, device=dev)
        own = torch.tensor(owner, device=dev)
        try:
            with torch.no_grad():
                base = model.lm_head(run_from(model, layer, inp)[:, off:]).float()
                kl_ref = F.log_softmax(base[kl_sel, kl_idx], dim=-1)
            opt = torch.optim.Adam([d], lr=c.lr)
            for _ in range(c.steps):
                logits = model.lm_head(run_from(model, layer, inp)[:, off:]).float()  # answer positions only
                nll_rows = torch.stack(
                    [
                        F.cross_entropy(logits[i, starts[i] - 1 - off : starts[i] - 1 - off + len(t)], t)
                        for i, t in enumerate(targets)
                    ]
                )
                nll = torch.zeros(len(edits), device=dev).index_add(0, own, nll_rows) / torch.bincount(own)
                if bool((nll < c.stop_loss).all()):
                    break
                kl = F.kl_div(F.log_softmax(logits[kl_sel, kl_idx], dim=-1), kl_ref, log_target=True, reduction="none")
                decay = d.norm(dim=1) ** 2 / box["orig"].norm(dim=1) ** 2
                loss = (nll + c.kl_factor * kl.sum(-1) + c.weight_decay * decay).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    limit = c.clamp_norm * box["orig"].norm(dim=1, keepdim=True)
                    d.mul_(torch.clamp(limit / d.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0))
        finally:
            handle.remove()
        return d.detach(), box["orig"]

    # --- artifacts -----------------------------------------------------------------------------
    def _artifact(self, edit: EditRequest, u: torch.Tensor, v: torch.Tensor) -> Artifact:
        return self.new_artifact(
            edit,
            {"u": u.float().cpu().contiguous(), "v": v.float().cpu().contiguous()},
            layers=self.layers,
            params=self.params,
        )

    def _changes(self, artifact: Artifact) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        u, v = artifact.tensors["u"], artifact.tensors["v"]
        if artifact.meta.get("params") != self.params or u.shape[0] != len(self.modules):
            raise ConfigError(
                f"artifact {artifact.edit_id} edits {artifact.meta.get('params')}, this {self.name} edits {self.params}"
            )
        return [(m, delta(m, u[j].to(self.lm.device), v[j].to(self.lm.device))) for j, m in enumerate(self.modules)]

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        out: list[Artifact] = []
        size = self.config.batch if self.batch_edits else 1
        steps = range(0, len(edits), size)
        with torch.enable_grad():  # a bar when a call solves more than one step (benchmarks, replays)
            for i in tqdm(steps, desc=f"{self.name} edits", unit="step", disable=len(steps) < 2, leave=False):
                changes = [ch for a in out for ch in self._changes(a)]
                with temporarily_added(changes):  # later edits are solved on top of the earlier ones
                    out += self._solve(list(edits[i : i + size]))
        return out

    def _solve(self, edits: list[EditRequest]) -> list[Artifact]:
        raise NotImplementedError


class Rome(LocateEdit):
    """One rank-one change of one MLP output matrix per edit."""

    name = "rome"

    def default_layers(self, n: int) -> list[int]:
        return [n // 6]

    def _solve(self, edits: list[EditRequest]) -> list[Artifact]:
        (edit,) = edits
        (layer,), (module,) = self.layers, self.modules
        subject = edit.subject if edit.subject and edit.subject in edit.prompt else None
        d, _ = self._target_delta(layer, [edit])
        d = d[0]
        with torch.no_grad():
            bare = self._keys(layer, [edit.prompt], subject)
            k = self._keys(layer, self._key_contexts(edit), subject)
            v_star = output_of(module, bare) + d  # the new output wanted for this key
            cov = self.mom2[layer]
            cov = cov + self.config.regularise * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
            ck = torch.linalg.solve(cov, k)
            right = ck / (ck @ k)
            u = v_star - output_of(module, k)
        return [self._artifact(edit, u[None], right[None])]


class Memit(LocateEdit):
    """A batch of edits spread over a range of layers, solved jointly (per-edit rank-one factors)."""

    name = "memit"
    batch_edits = True

    def default_layers(self, n: int) -> list[int]:
        """Up to five layers ending at n // 6 + 1, and never the last layer: the target hidden state
        is optimised at the top edited layer's output, which reaches the answer only through a
        layer above it (on a 2-layer model the final layer's output at the subject moved nothing,
        and MEMIT made no edit)."""
        top = max(0, min(n // 6 + 1, n - 2))
        return list(range(max(0, top - 4), top + 1))

    def _solve(self, edits: list[EditRequest]) -> list[Artifact]:
        last = self.layers[-1]
        subjects = [e.subject if e.subject and e.subject in e.prompt else None for e in edits]
        d, orig = self._target_delta(last, edits)
        z = orig + d  # (n, d_model): wanted hidden states after the last layer
        us = [[] for _ in edits]
        vs = [[] for _ in edits]
        applied: list[tuple[torch.nn.Module, torch.Tensor]] = []
        for j, (layer, module) in enumerate(zip(self.layers, self.modules, strict=True)):
            with temporarily_added(applied), torch.no_grad():
                keys = self._batch_keys(
                    layer, [(self._key_contexts(e), s) for e, s in zip(edits, subjects, strict=True)]
                )
                now = self._hidden(last, list(zip(edits, subjects, strict=True)))
            resid = (z - now) / (len(self.layers) - j)  # (n, d_model)
            cov = self.mom2[layer]
            with torch.no_grad():
                a = self.config.mom2_weight * cov + keys.T @ keys
                adj = torch.linalg.solve(a, keys.T)  # (d_ff, n)
            for i in range(len(edits)):
                us[i].append(resid[i])
                vs[i].append(adj[:, i])
            applied.append((module, delta(module, resid.T, adj)))
        return [self._artifact(e, torch.stack(u), torch.stack(v)) for e, u, v in zip(edits, us, vs, strict=True)]

    def _hidden(self, layer: int, pairs: list[tuple[EditRequest, str | None]]) -> torch.Tensor:
        """Output of decoder layer `layer` at the subject's last token of each bare prompt, (n, d_model)."""
        ids, mask, pos = self._left_padded([e.prompt for e, _ in pairs], [s for _, s in pairs])
        box: dict[str, torch.Tensor] = {}

        def hook(_module, _args, out):
            box["h"] = (out[0] if isinstance(out, tuple) else out)[torch.arange(len(pairs)), pos].float()
            raise _Stop

        handle = decoder_layers(self.lm.model)[layer].register_forward_hook(hook)
        try:
            with contextlib.suppress(_Stop):
                self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        finally:
            handle.remove()
        return box["h"]
