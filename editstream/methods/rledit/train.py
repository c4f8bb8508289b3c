"""Training RLEdit's hypernetworks on trajectories of train-split edit batches.

A trajectory is `trajectory` batches of `batch` train edits, edited one after another: each step
reads the batch's keys and gradients on the model the earlier steps already changed, makes the
shift (with the graph back to the hypernetworks), and scores, with the shift in effect:

* the batch's prompts and paraphrases (negative log-likelihood of the targets);
* memory backtracking: the last `backtrack` batches' prompts again, weighted `decay ** age`, so a
  shift that breaks earlier edits costs;
* locality: KL from the model before the step to the model after it, on the batch's locality prompts;
* L2: the shift's squared Frobenius norm, with a real gradient (it is computed from the factors).

Each step's loss is backpropagated at once (its graph ends at its own shift; earlier shifts are in
the weights as constants); the hypernetworks take one optimiser step per trajectory, the gradients
added up over it (`update="trajectory"`), or one after every batch (`update="batch"`). The weights
are restored after every trajectory. Held-back train edits are edited as one trajectory every
`validate_every` trajectories and scored teacher-forced; the best hypernetworks by that score are
the exported checkpoint, and the run resumes from `train_state.*` in its output directory.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from editstream.bench.wild_scores import locality_prompts
from editstream.config import config_to_dict
from editstream.edits import EditRequest
from editstream.generation import positions
from editstream.methods import create_method
from editstream.methods.rledit.below import BelowBand
from editstream.methods.rledit.config import RLEditConfig, TrainConfig
from editstream.methods.rledit.method import (
    Hypernets,
    KeyReader,
    answer_nll,
    edited_modules,
    new_hypernets,
    project_keys,
    save_hypernets,
)
from editstream.methods.rome.weights import delta
from editstream.metrics import encode_pairs, token_accuracy
from editstream.models import LoadedLM
from editstream.replica import Replica
from editstream.train_state import load_state, save_state

log = logging.getLogger(__name__)


class Shifts:
    """Adds x U^T A to each edited module's output while set: a shift with its graph intact."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handles = [m.register_forward_hook(self._hook(j)) for j, m in enumerate(modules)]

    def _hook(self, j: int):
        def add(_module, args, out):
            if self.factors is None:
                return out
            u, a = self.factors[j]
            return out + ((args[0].float() @ u.T) @ a).to(out.dtype)

        return add

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pairs_loss(lm: LoadedLM, edits: Sequence[EditRequest], paraphrases: bool = True) -> torch.Tensor:
    """Mean NLL of the targets after each edit's prompt (and its first paraphrase). Prompts and
    paraphrases are separate batches: the prompts' batch is the one the keys were read from, so
    `BelowBand` has its lower layers already."""
    groups = [[(e.prompt, e.target) for e in edits]]
    if paraphrases:
        groups.append([(e.paraphrases[0], e.target) for e in edits if e.paraphrases])
    total, count = torch.zeros((), device=lm.device), 0
    for pairs in filter(None, groups):
        batch = encode_pairs(lm.tokenizer, [t for t, _ in pairs], [a for _, a in pairs])
        ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
        total = total + answer_nll(lm, ids, mask, batch.answer_ids, batch.answer_start)
        count += len(pairs)
    return total / count


def next_token_logprobs(lm: LoadedLM, prompts: Sequence[str]) -> torch.Tensor:
    """Log-probabilities of the token after each prompt, (N, vocab); the LM head runs only at the
    last position (prompts are left-padded)."""
    enc = lm.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    mask = enc["attention_mask"]
    hidden = lm.model.base_model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions(mask))
    logits = lm.model.get_output_embeddings()(hidden.last_hidden_state[:, -1])
    return F.log_softmax(logits.float(), dim=-1)


class RLEditTrainer:
    """`run()` trains and exports; state is saved after every trajectory, so a killed run resumes."""

    def __init__(
        self, lm: LoadedLM, edits: list[EditRequest], out: Path, config: RLEditConfig, schedule: TrainConfig
    ) -> None:
        self.lm, self.out, self.config, self.schedule = lm, out, config, schedule
        order = list(range(len(edits)))
        random.Random(schedule.seed).shuffle(order)
        n_val = schedule.validation_edits
        self.val = [edits[i] for i in order[:n_val]]
        self.train = [edits[i] for i in order[n_val:]]
        if len(self.train) < schedule.batch:
            raise ValueError(f"{len(self.train)} train edits after validation; a batch needs {schedule.batch}")
        named = edited_modules(lm.model, config)
        self.names, self.modules = [n for n, _ in named], [m for _, m in named]
        self.band_start = min(int(n.split(".")[0]) for n in self.names)  # nothing below it changes
        self.cache_counts = (0, 0)  # BelowBand's (hits, misses) in the last trajectory
        self.updates = 0  # optimiser steps taken by this trainer
        self.scorer = Replica(create_method("none", lm))  # teacher-forced scores on the weights as they are
        self.nets: Hypernets = new_hypernets(lm, config)
        project_keys(self.nets, lm, config)
        groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}  # is it a log step size or ridge strength
        for name, p in self.nets.named_parameters():
            groups[name.endswith(("log_lr", "log_lambda"))].append(p)
        self.opt = torch.optim.Adam(
            [{"params": groups[False]}, {"params": groups[True], "lr": schedule.log_lr}], lr=schedule.lr
        )
        self.reader = KeyReader(lm, self.modules, config.positions)
        self.state: dict[str, Any] = {"trajectory": 0, "best": None, "history": []}
        saved = load_state(out, {"nets": self.nets}, {"opt": self.opt}, self._config_key())
        if saved is not None:
            self.state = {k: saved[k] for k in ("trajectory", "best", "history")}
            log.info("resumed at trajectory %d", self.state["trajectory"])

    def _config_key(self) -> dict:
        return {"rledit": config_to_dict(self.config), "train": config_to_dict(self.schedule)}

    # --- one trajectory ---------------------------------------------------------------------------
    def step(self, batch: list[EditRequest], earlier: list[list[EditRequest]], shifts: Shifts) -> dict[str, float]:
        """One edit step: losses with this batch's shift in effect, backpropagated into the
        hypernetworks' gradients (scaled to a trajectory's mean unless each batch is its own update);
        then the shift goes into the weights (without a graph)."""
        s = self.schedule
        u, grads, _ = self.reader.read(batch)
        local = locality_prompts(batch)
        with torch.no_grad():
            before = next_token_logprobs(self.lm, local) if local else None
        factors = [self.nets.factors(j, u[j], grads[j]) for j in range(len(self.modules))]
        shifts.factors = factors
        try:
            edit = pairs_loss(self.lm, batch)
            back = torch.zeros((), device=self.lm.device)
            for age, b in enumerate(reversed(earlier)):  # memory backtracking: earlier batches still hold
                back = back + s.decay ** (age + 1) * pairs_loss(self.lm, b, paraphrases=False)
            loc = torch.zeros((), device=self.lm.device)
            if before is not None:
                after = next_token_logprobs(self.lm, local)
                loc = F.kl_div(after, before, log_target=True, reduction="batchmean")
            l2 = sum(((kj.T @ aj) ** 2).sum() for kj, aj in factors)
            total = edit + back + s.locality_weight * loc + s.l2_weight * l2
            (total if s.update == "batch" else total / s.trajectory).backward()
        finally:
            shifts.factors = None
        with torch.no_grad():
            for m, (kj, aj) in zip(self.modules, factors, strict=True):
                m.weight += delta(m, aj.detach().T, kj.detach().T)
        named = {"edit": edit, "backtrack": back, "locality": loc, "l2": l2}
        return {k: float(v.detach()) for k, v in named.items()}

    def trajectory(self, rng: random.Random, learn: bool = True) -> dict[str, float]:
        """Edit one trajectory of sampled batches and return its mean losses; `learn`: then take the
        optimiser step (False: only measure, for tests and diagnostics)."""
        s = self.schedule
        saved = [m.weight.detach().clone() for m in self.modules]
        below = BelowBand(self.lm.model, self.band_start) if s.cache_below and self.band_start > 0 else None
        shifts = Shifts(self.modules)
        self.nets.train()
        self.opt.zero_grad()
        losses: list[dict[str, float]] = []
        batches: list[list[EditRequest]] = []
        try:
            for _ in range(s.trajectory):
                batch = rng.sample(self.train, s.batch)
                losses.append(self.step(batch, batches[-s.backtrack :] if s.backtrack else [], shifts))
                batches.append(batch)
                if s.update == "batch":
                    self._optimise(learn)
            self._optimise(learn and s.update == "trajectory")
        finally:
            shifts.remove()
            if below is not None:
                self.cache_counts = (below.hits, below.misses)
                below.remove()
            with torch.no_grad():
                for m, w in zip(self.modules, saved, strict=True):
                    m.weight.copy_(w)
        return {k: sum(d[k] for d in losses) / len(losses) for k in losses[0]}

    def _optimise(self, learn: bool) -> None:
        """Take the optimiser step on the gradients gathered since the last one (if `learn`), then
        clear them."""
        if learn:
            torch.nn.utils.clip_grad_norm_(self.nets.parameters(), 1.0)
            self.opt.step()
            self.updates += 1
        self.opt.zero_grad()

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Edit the held-back edits in batches, one after another, then score them all teacher-forced:
        reliability (prompts), generality (first paraphrases), locality (agreement with the unedited
        model on their locality probes), and the mean of the three (of those measured)."""
        probes = [(p.prompt, p.answer) for e in self.val for p in e.locality]
        before = self.scorer.predict([p for p, _ in probes], [a for _, a in probes])[0] if probes else []
        saved = [m.weight.detach().clone() for m in self.modules]
        self.nets.eval()
        try:
            for i in range(0, len(self.val), self.schedule.batch):
                batch = self.val[i : i + self.schedule.batch]
                u, grads, _ = self.reader.read(batch)
                with torch.no_grad():
                    for j, m in enumerate(self.modules):
                        keys, values = self.nets.factors(j, u[j], grads[j])
                        m.weight += delta(m, values.T, keys.T)
            preds, ids, _ = self.scorer.predict([e.prompt for e in self.val], [e.target for e in self.val])
            scores = {"reliability": mean_accuracy(preds, ids)}
            paired = [(e.paraphrases[0], e.target) for e in self.val if e.paraphrases]
            if paired:
                preds, ids, _ = self.scorer.predict([p for p, _ in paired], [t for _, t in paired])
                scores["generality"] = mean_accuracy(preds, ids)
            if probes:
                after = self.scorer.predict([p for p, _ in probes], [a for _, a in probes])[0]
                scores["locality"] = mean_accuracy(after, before)
        finally:
            with torch.no_grad():
                for m, w in zip(self.modules, saved, strict=True):
                    m.weight.copy_(w)
        return {**scores, "score": sum(scores.values()) / len(scores)}

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.schedule
        rng = random.Random(s.seed + 1 + self.state["trajectory"])
        started = time.perf_counter()
        bar = tqdm(range(self.state["trajectory"], s.trajectories), desc="rledit trajectories", unit="traj")
        for t in bar:
            losses = self.trajectory(rng)
            self.state["trajectory"] = t + 1
            record: dict[str, Any] = {"trajectory": t + 1, **{k: round(v, 5) for k, v in losses.items()}}
            if (t + 1) % s.validate_every == 0 or t + 1 == s.trajectories:
                record["validation"] = self.validate()
                if self.state["best"] is None or record["validation"]["score"] > self.state["best"]["score"]:
                    self.state["best"] = {"trajectory": t + 1, **record["validation"]}
                    self._export()
            bar.set_postfix(edit=f"{losses['edit']:.3f}", loc=f"{losses['locality']:.4f}")
            self.state["history"].append(record)
            save_state(self.out, {"nets": self.nets}, {"opt": self.opt}, {**self.state, "config": self._config_key()})
        return {**self.state, "seconds": round(time.perf_counter() - started, 1)}

    def _export(self) -> None:
        info = {
            "llm": self.lm.name,
            "llm_fingerprint": self.lm.fingerprint,
            "modules": self.names,
            "train": config_to_dict(self.schedule),
            "validation": self.state["best"],
        }
        save_hypernets(self.nets, self.config, self.out, info)


def mean_accuracy(predicted: Sequence[Sequence[int]], expected: Sequence[Sequence[int]]) -> float:
    scores = [token_accuracy(p, a) for p, a in zip(predicted, expected, strict=True)]
    return sum(scores) / len(scores) if scores else float("nan")
