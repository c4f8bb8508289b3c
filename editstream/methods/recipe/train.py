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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from editstream import wild
from editstream.config import config_to_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.generation import chat_text, greedy, template_heads
from editstream.methods.recipe.checkpoint import load_checkpoint, save_checkpoint
from editstream.methods.recipe.config import RecipeConfig, TrainConfig
from editstream.methods.recipe.continuation import pair_ids, teacher_continuations
from editstream.methods.recipe.negatives import subject_swaps
from editstream.methods.recipe.network import RecipeNet, target_token_embeddings
from editstream.metrics import left_pad
from editstream.models import LoadedEncoder, LoadedLM
from editstream.prefix import insert_prefix, prepend_prefix, soft_prefix
from editstream.train_state import load_state, save_state

log = logging.getLogger(__name__)


@dataclass
class TrainRows:
    """Edits usable for training (each has a paraphrase and a locality probe) and their encodings."""

    edits: list[EditRequest]
    r_prompt: torch.Tensor
    r_para: torch.Tensor
    r_loc: torch.Tensor
    r_statement: torch.Tensor | None
    r_neg: torch.Tensor | None = None  # (N, 2, enc): subject-swap negatives (negatives.subject_swaps)

    def subset(self, idx: Sequence[int]) -> TrainRows:
        ix = torch.tensor(list(idx))
        return TrainRows(
            [self.edits[i] for i in idx],
            self.r_prompt[ix],
            self.r_para[ix],
            self.r_loc[ix],
            None if self.r_statement is None else self.r_statement[ix],
            None if self.r_neg is None else self.r_neg[ix],
        )


def encode_rows(
    edits: list[EditRequest], encoder: LoadedEncoder, cache: Path, statements: bool, negatives: bool = False
) -> TrainRows:
    """Encoder embeddings of prompts, paraphrases, locality prompts (and statements, and the
    subject-swap negatives), cached on disk.

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
    if negatives:
        texts["neg_relation"], texts["neg_subject"] = subject_swaps(edits)
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
    neg = torch.stack([enc["neg_relation"], enc["neg_subject"]], dim=1) if negatives else None
    return TrainRows(edits, enc["prompt"], enc["para"], enc["loc"], enc.get("statement"), neg)


def split_rows(rows: TrainRows, schedule: TrainConfig) -> tuple[TrainRows, TrainRows]:
    """(validation, training) rows: the first `validation_rows` of a `seed` shuffle are held back."""
    order = list(range(len(rows.edits)))
    random.Random(schedule.seed).shuffle(order)
    n_val = schedule.validation_rows
    return rows.subset(order[:n_val]), rows.subset(order[n_val:])


def retriever_loss(net: RecipeNet, r_prompt, r_para, r_loc, r_neg=None) -> tuple[torch.Tensor, dict[str, float]]:
    """In-batch contrast over [keys..., sentinel] for prompt, paraphrase and locality queries, and
    (if given) subject-swap negatives (B, m, enc), which must pick the sentinel too."""
    ret = net.retriever
    keys = ret.keys(r_prompt)
    scale = ret.log_scale.exp()
    n = len(keys)
    losses, accs = [], {}
    queries = [
        ("rel", r_prompt, torch.arange(n)),
        ("gen", r_para, torch.arange(n)),
        ("loc", r_loc, torch.full((n,), n)),
    ]
    if r_neg is not None:
        flat = r_neg.reshape(-1, r_neg.shape[-1])
        queries.append(("neg", flat, torch.full((len(flat),), n)))
    for name, r, target in queries:
        q = ret.queries(r)
        logits = torch.cat([q @ keys.T, ret.sentinel_score(q)[:, None]], dim=1) * scale
        losses.append(F.cross_entropy(logits, target))
        accs[name] = (logits.argmax(-1) == target).float().mean().item()
    return sum(losses) / len(losses), accs


def generated_prompts(net: RecipeNet, lm: LoadedLM, rows: TrainRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The full prefixes (B, slots, d) and their masks (B, slots) for the rows' edits."""
    config = net.config
    if config.uses_target_embeddings:
        t = target_token_embeddings(
            lm.model.get_input_embeddings(), lm.tokenizer, [e.target for e in rows.edits], config.target_slots
        )
        return net.generator.prefix(net.generator(rows.r_prompt, t), t)
    return net.generator.prefix(net.generator(rows.r_statement), None)


def id_logits(
    lm: LoadedLM,
    prefix: torch.Tensor | None,
    rows: Sequence[list[int]],
    positions: Sequence[list[int]],
    prefix_mask: torch.Tensor | None = None,
    offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits at `positions` (indices into each token row) with `prefix` before each row, in row order;
    with `offsets`, row i's prefix goes after its first offsets[i] tokens (a chat template's head),
    and every position must lie after it.

    Rows are left-padded into one batch; the decoder runs once and the LM head only where asked.
    """
    dev = lm.device
    ids, mask = left_pad(rows, lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0)
    ids, mask = ids.to(dev), mask.to(dev)
    width = ids.shape[1]
    embeds = lm.model.get_input_embeddings()(ids)
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix.shape[1]
        if prefix_mask is None:
            prefix_mask = torch.ones(prefix.shape[:2], device=dev)
        if offsets is None:
            embeds, mask, pos = prepend_prefix(embeds, mask, prefix, prefix_mask)
        else:
            at = torch.tensor([width - len(r) + o for r, o in zip(rows, offsets, strict=True)], device=dev)
            embeds, mask, pos = insert_prefix(embeds, mask, prefix, prefix_mask, at)
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    r_idx = [i for i, ps in enumerate(positions) for _ in ps]
    c_idx = [n_prefix + width - len(rows[i]) + p for i, ps in enumerate(positions) for p in ps]
    return lm.model.get_output_embeddings()(hidden[torch.tensor(r_idx, device=dev), torch.tensor(c_idx, device=dev)])


def answer_logits(
    lm: LoadedLM, prefix: torch.Tensor | None, contexts, answers, prefix_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions (and the answer ids), with `prefix` before each context."""
    pairs = [pair_ids(lm, c, a) for c, a in zip(contexts, answers, strict=True)]
    rows = [c + a for c, a in pairs]
    positions = [list(range(len(c) - 1, len(c) - 1 + len(a))) for c, a in pairs]
    logits = id_logits(lm, prefix, rows, positions, prefix_mask)
    return logits, torch.tensor([t for _, a in pairs for t in a], device=lm.device)


@dataclass
class Readings:
    """The texts a generator step trains on: per reading, the context the prefix goes into, the
    target after it, what goes between them (" ", or "" for a chat reply), how many context tokens
    come before the prefix (a chat template's head) and which edit's prefix it reads."""

    contexts: list[str]
    targets: list[str]
    leads: list[str]
    offsets: list[int]
    edits: list[int]

    def subset(self, idx: Sequence[int]) -> Readings:
        return Readings(*([getattr(self, f.name)[i] for i in idx] for f in fields(self)))


def as_chat(lm: LoadedLM, questions: Sequence[str]) -> tuple[list[str], list[int]]:
    """Each question as the user turn of the model's chat template, and the template's tokens before
    it: where `Replica.generate(chat=True)` puts an edit's prefix."""
    templated = [chat_text(lm, q) for q in questions]
    return templated, template_heads(lm, templated, questions)


def readings(lm: LoadedLM, edits: Sequence[EditRequest], chat: bool = False) -> Readings:
    """Each edit's prompt and first paraphrase, plainly; with `chat`, also each question edit's
    prompt (even rows) or paraphrase (odd rows) as the user turn of the model's chat template, with
    the prefix right before the user's words, as `Replica.generate(chat=True)` serves it."""
    n = len(edits)
    texts = [e.prompt for e in edits] + [e.paraphrases[0] for e in edits]
    r = Readings(texts, [e.target for e in edits] * 2, [" "] * 2 * n, [0] * 2 * n, list(range(n)) * 2)
    if chat:
        asked = [(i, e.prompt if i % 2 == 0 else e.paraphrases[0]) for i, e in enumerate(edits) if e.is_question]
        templated, heads = as_chat(lm, [q for _, q in asked])
        r.contexts += templated
        r.targets += [edits[i].target for i, _ in asked]
        r.leads += [""] * len(asked)
        r.offsets += heads
        r.edits += [i for i, _ in asked]
    return r


def _read(
    lm: LoadedLM, prefix: torch.Tensor, mask: torch.Tensor, r: Readings, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For readings of one form: (logits at the target's tokens, their ids, log-probs after the
    target, the teacher's there), from one teacher and one student forward."""
    cont, ends = teacher_continuations(lm, r.contexts, r.targets, k, r.leads)
    starts = [len(pair_ids(lm, c, t, d)[0]) for c, t, d in zip(r.contexts, r.targets, r.leads, strict=True)]
    answer_pos = [list(range(s - 1, e - 1)) for s, e in zip(starts, ends, strict=True)]
    positions = [a + c for a, c in zip(answer_pos, cont.positions, strict=True)]
    ix = torch.tensor(r.edits, device=prefix.device)
    logits = id_logits(lm, prefix[ix], cont.rows, positions, mask[ix], r.offsets)  # offset 0: right before the row
    is_answer = torch.tensor([j < len(a) for a, ps in zip(answer_pos, positions, strict=True) for j in range(len(ps))])
    answer_ids = torch.tensor([row[p + 1] for row, a in zip(cont.rows, answer_pos, strict=True) for p in a])
    return logits[is_answer], answer_ids.to(logits.device), logits[~is_answer].float().log_softmax(-1), cont.teacher


def continuation_loss(
    lm: LoadedLM, prefix: torch.Tensor, mask: torch.Tensor, rows: TrainRows, k: int, chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(cross-entropy on the target, KL to the plain-statement teacher after it, stats), on the
    prompt and the paraphrase of each row (and, with `chat`, the chat form of question rows). Plain
    and chat readings run as separate batches: padding every short prompt to a chat template's
    length would triple the step."""
    r = readings(lm, rows.edits, chat)
    forms = [[i for i, lead in enumerate(r.leads) if lead == want] for want in (" ", "")]
    parts = [_read(lm, prefix, mask, r.subset(idx), k) for idx in forms if idx]
    logits, ids, student, teacher = (torch.cat(x) for x in zip(*parts, strict=True))
    ce = F.cross_entropy(logits, ids)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    acc = (logits.argmax(-1) == ids).float().mean().item()
    return ce, kl, {"ce": ce.item(), "acc": acc, "cont_kl": kl.item()}


def generator_loss(net: RecipeNet, lm: LoadedLM, rows: TrainRows, schedule: TrainConfig):
    prefix, mask = generated_prompts(net, lm, rows)
    if schedule.continuation_weight > 0:
        loss, kl, stats = continuation_loss(lm, prefix, mask, rows, schedule.continuation_tokens, schedule.chat_form)
        loss = loss + schedule.continuation_weight * kl
    else:
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
    if schedule.locality_weight > 0:
        loc = [e.locality[0] for e in rows.edits]
        with torch.no_grad():
            base, _ = answer_logits(lm, None, [p.prompt for p in loc], [p.answer for p in loc])
        edited, _ = answer_logits(lm, prefix, [p.prompt for p in loc], [p.answer for p in loc], mask)
        kl = F.kl_div(edited.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean")
        loss = loss + schedule.locality_weight * kl
        stats["kl"] = kl.item()
    return loss, stats


@torch.no_grad()
def validate(net: RecipeNet, lm: LoadedLM, rows: TrainRows, batch: int = 32, wild_tokens: int = 24) -> dict[str, float]:
    """Oracle-retrieval scores on held-back train rows: teacher-forced token accuracy and, as a user
    reads it, WILD answer-first/exact and echo of a greedy `wild_tokens`-token answer (prompt and
    paraphrase), and for question rows the chat form (the reply's first sentence holds the target);
    retrieval hit/reject rates (and subject-swap rejection, where built)."""
    net.eval()
    _, acc = retriever_loss(net, rows.r_prompt, rows.r_para, rows.r_loc, rows.r_neg)
    scores: dict[str, list[float]] = {}
    for i in range(0, len(rows.edits), batch):
        part = rows.subset(range(i, min(i + batch, len(rows.edits))))
        prefix, mask = generated_prompts(net, lm, part)
        targets = [e.target for e in part.edits]
        for name, ctx in (
            ("reliability", [e.prompt for e in part.edits]),
            ("generality", [e.paraphrases[0] for e in part.edits]),
        ):
            logits, ids = answer_logits(lm, prefix, ctx, targets, mask)
            scores.setdefault(name, []).extend((logits.argmax(-1) == ids).float().tolist())
            if wild_tokens:
                with soft_prefix(lm.model, prefix, mask) as hooked:
                    texts = greedy(lm, ctx, wild_tokens, select_rows=hooked.select).texts
                for text, target in zip(texts, targets, strict=True):
                    answer = wild.cut(text, target)
                    scores.setdefault(f"wild_{name}", []).append(float(wild.answer_first(answer, target)))
                    scores.setdefault(f"wild_exact_{name}", []).append(float(wild.exact(answer, target)))
                    scores.setdefault("echo_2in24", []).append(float(wild.echo(text, target, repeats=2)))
        asked = [i for i, e in enumerate(part.edits) if e.is_question]
        if wild_tokens and asked:  # the question as a chat turn: does the reply's first sentence say it
            templated, heads = as_chat(lm, [part.edits[i].prompt for i in asked])
            ix = torch.tensor(asked, device=prefix.device)
            with soft_prefix(lm.model, prefix[ix], mask[ix]) as hooked:
                hooked.offsets = torch.tensor(heads)
                texts = greedy(lm, templated, wild_tokens, select_rows=hooked.select).texts
            for text, i in zip(texts, asked, strict=True):
                said = wild.contains(wild.cut(text, targets[i]), targets[i])
                scores.setdefault("wild_chat_reliability", []).append(float(said))
    net.train()
    return {
        "retrieval_rel": acc["rel"],
        "retrieval_gen": acc["gen"],
        "retrieval_loc_reject": acc["loc"],
        **({"retrieval_neg_reject": acc["neg"]} if "neg" in acc else {}),
        **{k: sum(v) / len(v) for k, v in scores.items()},
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
        init_from: Path | None = None,
    ) -> None:
        self.lm, self.out, self.config, self.schedule = lm, out, config, schedule
        rows = encode_rows(
            edits,
            encoder,
            out / "cache",
            statements=not config.uses_target_embeddings,
            negatives=schedule.subject_negatives,
        )
        self.val, self.train = split_rows(rows, schedule)
        embed_mean = lm.model.get_input_embeddings().weight.mean(0)
        self.net = RecipeNet(encoder.dim, embed_mean.shape[0], config, embed_mean).to(lm.device)
        self._init_end_slots()
        self.init_from = str(init_from) if init_from is not None else None
        if init_from is not None:
            self._warm_start(init_from)
        self.encoder_name = encoder.name
        self.ret_opt = torch.optim.Adam(self.net.retriever.parameters(), lr=schedule.retriever_lr)
        self.gen_opt = torch.optim.Adam(self.net.generator.parameters(), lr=schedule.generator_lr)
        self.state: dict[str, Any] = {"retriever_step": 0, "generator_step": 0, "history": []}
        self.rng = random.Random(schedule.seed + 1)
        self._resume()

    def _init_end_slots(self) -> None:
        n = self.config.end_slots
        if not n:
            return
        ids = self.lm.tokenizer(self.schedule.end_text, add_special_tokens=False)["input_ids"]
        if len(ids) != n:
            raise ConfigError(f"end_text {self.schedule.end_text!r} is {len(ids)} tokens; end_slots={n} needs {n}")
        with torch.no_grad():
            self.net.generator.end.copy_(self.lm.model.get_input_embeddings().weight[ids].float())

    def _warm_start(self, directory: Path) -> None:
        """Start from another checkpoint's weights wherever the shapes agree (e.g. before end slots)."""
        source, _ = load_checkpoint(directory)
        own = self.net.state_dict()
        taken = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
        self.net.load_state_dict(taken, strict=False)
        log.info("warm start from %s: %d of %d tensors", directory, len(taken), len(own))

    # --- resumable state ------------------------------------------------------------------------
    def _parts(self) -> tuple[dict, dict]:
        return {"": self.net}, {"ret": self.ret_opt, "gen": self.gen_opt}

    def _save_state(self) -> None:
        save_state(self.out, *self._parts(), {**self.state, "config": config_to_dict(self.config)})

    def _resume(self) -> None:
        saved = load_state(self.out, *self._parts(), config_to_dict(self.config))
        if saved is None:
            return
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
                None if rows.r_neg is None else rows.r_neg.to(self.lm.device),
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
            loss, stats = generator_loss(self.net, self.lm, self._sample(s.generator_batch), s)
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
            "init_from": self.init_from,
            "validation": self.state["history"][-1] if self.state["history"] else None,
        }
        save_checkpoint(self.net, self.out, info)

    def run(self) -> dict[str, Any]:
        self.net.train()
        self.train_retriever()
        self.train_generator()
        self.export()
        return self.state
