"""Training RECIPE on the train splits, LLM frozen.

Phase 1 trains the retriever on cached encoder embeddings (cheap, large in-batch contrast): a
prompt and its paraphrase must pick their own edit's key over the other keys and over the
Knowledge Sentinel; a locality prompt must pick the sentinel. Phase 2 trains the prompt generator
through the frozen LLM: the generated prompt, put before the edit prompt or its paraphrase, must
make the LLM produce the target (cross-entropy on the target tokens), optionally with a KL term
that keeps locality prompts' predictions unchanged. Checkpoints are resumable at any step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from editstream.config import config_to_dict
from editstream.edits import EditRequest
from editstream.methods.recipe.checkpoint import save_checkpoint
from editstream.methods.recipe.config import RecipeConfig, TrainConfig
from editstream.methods.recipe.network import RecipeNet, target_token_embeddings
from editstream.metrics import encode_pairs
from editstream.models import LoadedEncoder, LoadedLM
from editstream.prefix import prepend_prefix

log = logging.getLogger(__name__)


@dataclass
class TrainRows:
    """Edits usable for training (each has a paraphrase and a locality probe) and their encodings."""

    edits: list[EditRequest]
    r_prompt: torch.Tensor
    r_para: torch.Tensor
    r_loc: torch.Tensor
    r_statement: torch.Tensor | None

    def subset(self, idx: Sequence[int]) -> TrainRows:
        ix = torch.tensor(list(idx))
        return TrainRows(
            [self.edits[i] for i in idx],
            self.r_prompt[ix],
            self.r_para[ix],
            self.r_loc[ix],
            None if self.r_statement is None else self.r_statement[ix],
        )


def encode_rows(edits: list[EditRequest], encoder: LoadedEncoder, cache: Path, statements: bool) -> TrainRows:
    """Encoder embeddings of prompts, paraphrases, locality prompts (and statements), cached on disk.

    The cache file name hashes the encoder name and every text, so any change makes a new file.
    """
    edits = [e for e in edits if e.paraphrases and e.locality]
    texts = {
        "prompt": [e.prompt for e in edits],
        "para": [e.paraphrases[0] for e in edits],
        "loc": [e.locality[0].prompt for e in edits],
    }
    if statements:
        texts["statement"] = [e.statement for e in edits]
    h = hashlib.sha256(encoder.name.encode())
    for name in sorted(texts):
        h.update("\x1e".join(texts[name]).encode())
    path = cache / f"encodings-{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        enc = load_file(str(path))
    else:
        enc = {}
        for name, values in texts.items():
            log.info("encoding %d %s texts with %s", len(values), name, encoder.name)
            chunks = [
                encoder.encode(values[i : i + 1024]) for i in tqdm(range(0, len(values), 1024), desc=f"encode {name}")
            ]
            enc[name] = torch.cat(chunks).contiguous()
        cache.mkdir(parents=True, exist_ok=True)
        save_file(enc, str(path))
    return TrainRows(edits, enc["prompt"], enc["para"], enc["loc"], enc.get("statement"))


def retriever_loss(net: RecipeNet, r_prompt, r_para, r_loc) -> tuple[torch.Tensor, dict[str, float]]:
    """In-batch contrast over [keys..., sentinel] for prompt, paraphrase and locality queries."""
    ret = net.retriever
    keys = ret.keys(r_prompt)
    scale = ret.log_scale.exp()
    n = len(keys)
    losses, accs = [], {}
    for name, r, target in (
        ("rel", r_prompt, torch.arange(n)),
        ("gen", r_para, torch.arange(n)),
        ("loc", r_loc, torch.full((n,), n)),
    ):
        q = ret.queries(r)
        logits = torch.cat([q @ keys.T, ret.sentinel_score(q)[:, None]], dim=1) * scale
        losses.append(F.cross_entropy(logits, target))
        accs[name] = (logits.argmax(-1) == target).float().mean().item()
    return sum(losses) / 3, accs


def generated_prompts(net: RecipeNet, lm: LoadedLM, rows: TrainRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The full prefixes (B, slots, d) and their masks (B, slots) for the rows' edits."""
    config = net.config
    if config.uses_target_embeddings:
        t = target_token_embeddings(
            lm.model.get_input_embeddings(), lm.tokenizer, [e.target for e in rows.edits], config.target_slots
        )
        return net.generator.prefix(net.generator(rows.r_prompt, t), t)
    return net.generator.prefix(net.generator(rows.r_statement), None)


def answer_logits(
    lm: LoadedLM, prefix: torch.Tensor | None, contexts, answers, prefix_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions (and the answer ids), with `prefix` before each context.

    Runs the decoder once and the LM head only where answers are predicted.
    """
    batch = encode_pairs(lm.tokenizer, contexts, answers)
    dev = lm.device
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    embeds = lm.model.get_input_embeddings()(ids)
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix.shape[1]
        if prefix_mask is None:
            prefix_mask = torch.ones(prefix.shape[:2], device=dev)
        embeds, mask, pos = prepend_prefix(embeds, mask, prefix, prefix_mask)
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    rows, cols, targets = [], [], []
    for i, (start, ans) in enumerate(zip(batch.answer_start, batch.answer_ids, strict=True)):
        for j, tok in enumerate(ans):
            rows.append(i)
            cols.append(n_prefix + start - 1 + j)
            targets.append(tok)
    logits = lm.model.get_output_embeddings()(hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)])
    return logits, torch.tensor(targets, device=dev)


def generator_loss(net: RecipeNet, lm: LoadedLM, rows: TrainRows, locality_weight: float):
    prefix, mask = generated_prompts(net, lm, rows)
    targets = [e.target for e in rows.edits]
    logits, ids = answer_logits(
        lm,
        prefix.repeat(2, 1, 1),
        [e.prompt for e in rows.edits] + [e.paraphrases[0] for e in rows.edits],
        targets * 2,
        mask.repeat(2, 1),
    )
    loss = F.cross_entropy(logits, ids)
    stats = {"ce": loss.item(), "acc": (logits.argmax(-1) == ids).float().mean().item()}
    if locality_weight > 0:
        loc = [e.locality[0] for e in rows.edits]
        with torch.no_grad():
            base, _ = answer_logits(lm, None, [p.prompt for p in loc], [p.answer for p in loc])
        edited, _ = answer_logits(lm, prefix, [p.prompt for p in loc], [p.answer for p in loc], mask)
        kl = F.kl_div(edited.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean")
        loss = loss + locality_weight * kl
        stats["kl"] = kl.item()
    return loss, stats


@torch.no_grad()
def validate(net: RecipeNet, lm: LoadedLM, rows: TrainRows, batch: int = 32) -> dict[str, float]:
    """Oracle-retrieval token accuracy (reliability, generality) and retrieval hit/reject rates."""
    net.eval()
    _, acc = retriever_loss(net, rows.r_prompt, rows.r_para, rows.r_loc)
    correct = {"reliability": [], "generality": []}
    for i in range(0, len(rows.edits), batch):
        part = rows.subset(range(i, min(i + batch, len(rows.edits))))
        prefix, mask = generated_prompts(net, lm, part)
        for name, ctx in (
            ("reliability", [e.prompt for e in part.edits]),
            ("generality", [e.paraphrases[0] for e in part.edits]),
        ):
            logits, ids = answer_logits(lm, prefix, ctx, [e.target for e in part.edits], mask)
            correct[name].extend((logits.argmax(-1) == ids).float().tolist())
    net.train()
    return {
        "retrieval_rel": acc["rel"],
        "retrieval_gen": acc["gen"],
        "retrieval_loc_reject": acc["loc"],
        **{k: sum(v) / len(v) for k, v in correct.items()},
    }


class Trainer:
    """Runs both phases with resumable state in `out` (train_state.safetensors + train_state.json)."""

    def __init__(
        self,
        lm: LoadedLM,
        encoder: LoadedEncoder,
        edits: list[EditRequest],
        out: Path,
        config: RecipeConfig,
        schedule: TrainConfig,
    ) -> None:
        self.lm, self.out, self.config, self.schedule = lm, out, config, schedule
        rows = encode_rows(edits, encoder, out / "cache", statements=not config.uses_target_embeddings)
        order = list(range(len(rows.edits)))
        random.Random(schedule.seed).shuffle(order)
        n_val = schedule.validation_rows
        self.val, self.train = rows.subset(order[:n_val]), rows.subset(order[n_val:])
        embed_mean = lm.model.get_input_embeddings().weight.mean(0)
        self.net = RecipeNet(encoder.dim, embed_mean.shape[0], config, embed_mean).to(lm.device)
        self.encoder_name = encoder.name
        self.ret_opt = torch.optim.Adam(self.net.retriever.parameters(), lr=schedule.retriever_lr)
        self.gen_opt = torch.optim.Adam(self.net.generator.parameters(), lr=schedule.generator_lr)
        self.state: dict[str, Any] = {"retriever_step": 0, "generator_step": 0, "history": []}
        self.rng = random.Random(schedule.seed + 1)
        self._resume()

    # --- resumable state ------------------------------------------------------------------------
    def _state_paths(self) -> tuple[Path, Path]:
        return self.out / "train_state.safetensors", self.out / "train_state.json"

    def _save_state(self) -> None:
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        for name, opt in (("ret", self.ret_opt), ("gen", self.gen_opt)):
            for pid, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{name}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        weights, meta = self._state_paths()
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        tmp.rename(weights)
        meta.write_text(json.dumps({**self.state, "config": config_to_dict(self.config)}, indent=1))

    def _resume(self) -> None:
        weights, meta = self._state_paths()
        if not (weights.is_file() and meta.is_file()):
            return
        saved = json.loads(meta.read_text())
        if saved.get("config") != config_to_dict(self.config):
            log.warning("ignoring train state in %s: it was made with another config", self.out)
            return
        tensors = load_file(str(weights))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        for name, opt in (("ret", self.ret_opt), ("gen", self.gen_opt)):
            sd = opt.state_dict()
            for key, v in tensors.items():
                parts = key.split(".")
                if parts[:2] == ["opt", name]:
                    sd["state"].setdefault(int(parts[2]), {})[parts[3]] = v
            opt.load_state_dict(sd)
        self.state = {k: saved[k] for k in ("retriever_step", "generator_step", "history")}
        log.info(
            "resumed at retriever step %d, generator step %d",
            self.state["retriever_step"],
            self.state["generator_step"],
        )

    # --- phases -------------------------------------------------------------------------------
    def _sample(self, n: int) -> TrainRows:
        return self.train.subset(self.rng.sample(range(len(self.train.edits)), n))

    def train_retriever(self) -> None:
        s = self.schedule
        bar = tqdm(
            range(self.state["retriever_step"], s.retriever_steps),
            desc="retriever",
            initial=self.state["retriever_step"],
            total=s.retriever_steps,
        )
        for step in bar:
            rows = self._sample(min(s.retriever_batch, len(self.train.edits)))
            loss, acc = retriever_loss(
                self.net,
                rows.r_prompt.to(self.lm.device),
                rows.r_para.to(self.lm.device),
                rows.r_loc.to(self.lm.device),
            )
            self.ret_opt.zero_grad()
            loss.backward()
            self.ret_opt.step()
            self.state["retriever_step"] = step + 1
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in acc.items()})
        self._save_state()

    def train_generator(self) -> None:
        s = self.schedule
        bar = tqdm(
            range(self.state["generator_step"], s.generator_steps),
            desc="generator",
            initial=self.state["generator_step"],
            total=s.generator_steps,
        )
        started = time.time()
        for step in bar:
            loss, stats = generator_loss(self.net, self.lm, self._sample(s.generator_batch), s.locality_weight)
            self.gen_opt.zero_grad()
            loss.backward()
            self.gen_opt.step()
            self.state["generator_step"] = step + 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
            if (step + 1) % s.validate_every == 0 or step + 1 == s.generator_steps:
                val = validate(self.net, self.lm, self.val)
                self.state["history"].append(
                    {"step": step + 1, "seconds": round(time.time() - started, 1), **stats, **val}
                )
                log.info("step %d: %s", step + 1, json.dumps(val))
                self._save_state()
                self.export()
            elif (step + 1) % s.checkpoint_every == 0:
                self._save_state()

    def export(self) -> None:
        """Write the servable checkpoint (float16 weights + recipe.json) into `out`."""
        info = {
            "llm": self.lm.name,
            "llm_fingerprint": self.lm.fingerprint,
            "encoder": self.encoder_name,
            "schedule": config_to_dict(self.schedule),
            "steps": {k: self.state[k] for k in ("retriever_step", "generator_step")},
            "validation": self.state["history"][-1] if self.state["history"] else None,
        }
        save_checkpoint(self.net, self.out, info)

    def run(self) -> dict[str, Any]:
        self.net.train()
        self.train_retriever()
        self.train_generator()
        self.export()
        return self.state
