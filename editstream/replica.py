"""A replica: one model copy with one method's edit state, applying journal entries in `seq` order.

The replica is the plain class behind a Ray replica actor and the benchmark harness alike: it
applies edits and retracts strictly in order (replays of old seqs are ignored), reports `version`
(last applied seq) and a digest of its edit state, scores prompts teacher-forced, and generates.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field

import torch

from editstream.artifacts import Artifact, PackedArtifact
from editstream.errors import ConfigError, OrderError
from editstream.generation import (
    Decoded,
    Sampling,
    TextPieces,
    chat_text,
    glue_token_ids,
    greedy,
    stop_token_ids,
    template_heads,
)
from editstream.methods.base import EditMethod, QueryPlan, edits_digest
from editstream.metrics import PairBatch, answer_predictions, encode_pairs, positions_to_score
from editstream.models import LoadedLM

log = logging.getLogger(__name__)

SCOPES = ("answer", "text")


@dataclass
class Turns:
    """How a generation's prompts are read (plain, or as the last user turn of a chat after each
    row's earlier turns), how its tokens are chosen (greedy, or drawn by `sampling` from one
    generator for all its passes) and where its text goes as it is decoded (`on_text`, streaming)."""

    chat: bool
    history: Sequence[Sequence[dict[str, str]]]
    on_text: Callable[[int, str], None] | None = None
    sampling: tuple[Sampling, torch.Generator] | None = None
    halt: tuple[str, ...] = ()  # stop sequences: a row ends once its text holds one
    templated: dict[tuple[str, int], str] = field(default_factory=dict)  # the chat template, applied once

    def halted(self, text: str) -> bool:
        return any(h in text for h in self.halt)

    def text(self, lm: LoadedLM, prompt: str, row: int) -> str:
        if not self.chat:
            return prompt
        if (prompt, row) not in self.templated:
            self.templated[prompt, row] = chat_text(lm, prompt, self.history[row])
        return self.templated[prompt, row]

    def pieces(self, lm: LoadedLM, rows: Sequence[int] | None = None) -> TextPieces | None:
        return TextPieces(lm.tokenizer, self.on_text, rows) if self.on_text is not None else None


class PerFired(Sequence):
    """Per row of a plan, `rule(the edit that fired on it, or None)`, read when asked: a method that
    routes inside the model's forward (SCEN) knows which edit fired only once the prefill has run,
    and `greedy` reads these after it. A rule's value for an edit is kept once read."""

    def __init__(self, plan: QueryPlan, rule: Callable[[str | None], object]) -> None:
        self.plan, self.rule = plan, rule
        self._known: dict[str | None, object] = {}
        list(self)  # what is known now (a searched plan is), read now: under the caller's state lock

    def __len__(self) -> int:
        return len(self.plan.fired)

    def __getitem__(self, row: int) -> object:  # type: ignore[override]
        fired = self.plan.fired[row]
        if fired not in self._known:
            self._known[fired] = self.rule(fired)
        return self._known[fired]


def checked_scope(scope: str) -> str:
    """`scope` if it is an edit scope, else a ConfigError naming it."""
    if scope not in SCOPES:
        raise ConfigError(f"edit scope {scope!r}: expected one of {SCOPES}")
    return scope


@dataclass
class Answer:
    """A generated continuation, the edit that fired (if any) and the replica version that answered."""

    prompt: str
    text: str
    fired: str | None
    version: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # "stop": the model ended the text (EOS) before max_new_tokens


class Replica:
    """One model copy plus its edits; not thread-safe (an actor serialises calls)."""

    def __init__(self, method: EditMethod) -> None:
        self.method = method
        self.lm = method.lm
        self.version = 0
        self._stop_ids: torch.Tensor | None = None
        self._glue_ids: torch.Tensor | None = None
        self._silent_ids: torch.Tensor | None = None

    # --- the journal ---------------------------------------------------------------------------
    def _advance(self, seq: int) -> bool:
        if seq <= self.version:
            return False
        if seq != self.version + 1:
            raise OrderError(f"replica at version {self.version} got seq {seq}; expected {self.version + 1}")
        return True

    def apply(self, seq: int, artifact: Artifact) -> bool:
        """Apply journal entry `seq` (an edit); False if it was applied before."""
        if not self._advance(seq):
            return False
        self.method.apply(artifact)
        self.version = seq
        return True

    def retract(self, seq: int, edit_id: str) -> bool:
        """Apply journal entry `seq` (a retract of `edit_id`); False if it was applied before."""
        if not self._advance(seq):
            return False
        self.method.remove(edit_id)
        self.version = seq
        return True

    def skip(self, seq: int) -> bool:
        """Advance past journal entry `seq` without a state change (e.g. an entry another method owns)."""
        if not self._advance(seq):
            return False
        self.version = seq
        return True

    def digest(self) -> str:
        return state_digest(self.version, self.method.name, self.method.applied())

    # --- reading -------------------------------------------------------------------------------
    def _forward(self, batch: PairBatch) -> torch.Tensor:
        """Logits for the last positions of the batch's own tokens, which hold every answer."""
        dev = self.lm.device
        with torch.inference_mode():
            out = self.lm.model(
                input_ids=batch.input_ids.to(dev),
                attention_mask=batch.attention_mask.to(dev),
                logits_to_keep=positions_to_score(batch),  # the LM head only where answers are scored
            )
        return out.logits

    def predict(
        self, contexts: Sequence[str], answers: Sequence[str], edited: bool = True, batch_size: int = 32
    ) -> tuple[list[list[int]], list[list[int]], list[str | None]]:
        """Teacher-forced argmax at each answer token: (predictions, answer ids, fired edit ids)."""
        preds, ids, fired = [], [], []
        for i in range(0, len(contexts), batch_size):
            ctx, ans = list(contexts[i : i + batch_size]), list(answers[i : i + batch_size])
            with self._plan(ctx, edited) as plan:
                batch = encode_pairs(self.lm.tokenizer, plan.texts, ans)
                preds += answer_predictions(self._forward(batch), batch)
            ids += batch.answer_ids
            fired += plan.fired
        return preds, ids, fired

    def _plan(self, prompts: list[str], edited: bool):
        if edited:
            return self.method.query_context(prompts)
        return EditMethod.query_context(self.method, prompts)  # the base model only

    def nll(self, texts: Sequence[str], max_tokens: int = 64) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of `texts` (each cut to `max_tokens`) and the
        number of tokens predicted: perplexity = exp(sum / count), the general-ability probe. Weight
        edits are always in effect; retrieval methods see no edit prompt (none is asked)."""
        tok, dev = self.lm.tokenizer, self.lm.device
        total, count = 0.0, 0
        with torch.inference_mode():
            for text in texts:
                ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:max_tokens]], device=dev)
                if ids.shape[1] < 2:
                    continue
                logits = self.lm.model(input_ids=ids).logits[0, :-1]
                total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        return total, count

    def stop_token_ids(self) -> torch.Tensor:
        """Ids of tokens whose text holds a WILD stop (".", newline), computed once per replica."""
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self.lm)
        return self._stop_ids

    def set_edit_scope(self, scope: str) -> None:
        """How far a fired edit of a plan-only method shapes a generation (see `generate`)."""
        self.method.edit_scope = checked_scope(scope)

    def silent_ids(self) -> torch.Tensor:
        """Tokens a fired edit's row may not start with: end-of-text and the stops (".", newline),
        after which a user reads an empty answer; computed once per replica."""
        if self._silent_ids is None:
            eos = torch.tensor([self.lm.tokenizer.eos_token_id], dtype=torch.long, device=self.lm.device)
            self._silent_ids = torch.cat([eos, self.stop_token_ids()])
        return self._silent_ids

    def glue_token_ids(self) -> torch.Tensor:
        """Ids of tokens that would extend the word before them, computed once per replica."""
        if self._glue_ids is None:
            self._glue_ids = glue_token_ids(self.lm)
        return self._glue_ids

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        edited: bool = True,
        chat: bool = False,
        until_cut: bool = False,
        scope: str | None = None,
        state_lock: AbstractContextManager | None = None,
        history: Sequence[Sequence[dict[str, str]]] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
    ) -> list[Answer]:
        """Greedy continuation of each prompt (batched, KV-cached), with the edits in effect.

        chat: the edit is looked up on the prompt, which the model then reads as the user turn of
        its chat template. until_cut: stop a row at its first token holding "." or a newline (the
        WILD cut), for probes that only need the cut answer. scope (default: the method's
        `edit_scope`): "answer" lets a plan-only method's fired edit go once the row has said the
        edit's target or reached the cut, whichever comes first, and the base model continues from
        the prompt and what the edit made it say; "text" keeps the edit to the end. state_lock:
        held while the edit state is read (plan building), released while decoding, so a caller
        may apply edits meanwhile when the method's `decode_reads_state` is False. history (chat
        only): per row, the conversation's earlier turns ({"role", "content"} dicts) before the
        prompt, its last user turn; the edit is still looked up on the prompt alone. on_text(row,
        piece): called with each piece of text as it is decoded (streaming); the pieces of a row
        add up to its answer's text. sampling: draw tokens instead of the greedy choice. stop: texts
        that end a row's decoding once its text holds one (a request's stop sequences; the text
        still holds the stop, for the caller to cut).
        """
        scope = checked_scope(scope or self.method.edit_scope)
        if history is not None and not chat:
            raise ConfigError("a conversation history needs chat=True")
        drawn = (sampling, sampling.generator(self.lm.device)) if sampling is not None else None
        turns = Turns(chat, history or [()] * len(prompts), on_text, drawn, tuple(s for s in stop if s))
        stops = self.stop_token_ids() if until_cut else None
        if not edited or scope == "text" or not self.method.plan_only:
            return self._generate(prompts, max_new_tokens, edited, turns, stops, state_lock=state_lock)[0]
        answers, first = self._generate(
            prompts, max_new_tokens, True, turns, self.stop_token_ids(), until_cut, release=True, state_lock=state_lock
        )
        # rows whose edit let go (its target said, or the first stop reached) and that may go on
        go_on = [
            i
            for i, a in enumerate(answers)
            if a.fired is not None
            and not first.ended[i]
            and a.completion_tokens < max_new_tokens
            and not (until_cut and first.stopped[i])
            and not turns.halted(a.text)
        ]
        if not go_on:
            return answers
        rooms = [max_new_tokens - answers[i].completion_tokens for i in go_on]
        texts = [turns.text(self.lm, prompts[i], i) + answers[i].text for i in go_on]
        # the base model reads what it was made to say; a row let go right after the target's last
        # letters must not glue more letters onto it ("German" + "ic")
        unglued = (self.glue_token_ids(), [not first.stopped[i] for i in go_on])
        pieces = turns.pieces(self.lm, go_on)
        rest = greedy(
            self.lm, texts, max(rooms), stops, limits=rooms, unglued=unglued, on_tokens=pieces, sampling=turns.sampling,
            halt=turns.halt,
        )  # fmt: skip
        if pieces is not None:
            pieces.finish(rest)
        for i, text, produced, ended in zip(go_on, rest.texts, rest.produced, rest.ended, strict=True):
            a = answers[i]
            a.text += text
            a.completion_tokens += produced
            a.finish_reason = "stop" if ended else "length"
        return answers

    def _generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        edited: bool,
        turns: Turns,
        stops: torch.Tensor | None,
        until_cut: bool = True,
        release: bool = False,
        state_lock: AbstractContextManager | None = None,
    ) -> tuple[list[Answer], Decoded]:
        """One greedy pass under the plan. release: a row whose edit fired ends once it has said the
        edit's target or at a stop; other rows end at a stop only if `until_cut`."""
        with ExitStack() as stack:
            with state_lock or nullcontext():  # what the plan reads of the edit state, read now
                plan = stack.enter_context(self._plan(list(prompts), edited))
                version = self.version
                until = PerFired(plan, lambda f: self.method.target_of(f) if f else None) if release else None
                stop_rows = PerFired(plan, lambda f: until_cut or f is not None) if release else None
                fired_rows = PerFired(plan, lambda f: f is not None)
            texts = [turns.text(self.lm, t, i) for i, t in enumerate(plan.texts)]
            if turns.chat and plan.set_offsets is not None:  # a prefix goes right before the user's words
                plan.set_offsets(torch.tensor(template_heads(self.lm, texts, plan.texts), dtype=torch.long))
            pieces = turns.pieces(self.lm)
            # a fired edit says something: its row's first token is neither end-of-text nor a stop (the
            # unedited model may end at once after a question, or begin with a blank line)
            speak = (self.silent_ids(), fired_rows) if edited else None
            out = greedy(
                self.lm, texts, max_new_tokens, stops, plan.select_rows, plan.shrinkable, until, stop_rows,
                unglued=speak, on_tokens=pieces, sampling=turns.sampling, halt=turns.halt,
            )  # fmt: skip
            if pieces is not None:
                pieces.finish(out)
        read = [turns.text(self.lm, p, i) for i, p in enumerate(prompts)]  # what the model read, template included
        prompt_tokens = [len(t) for t in self.lm.tokenizer(read, add_special_tokens=False)["input_ids"]]
        answers = [
            Answer(p, t, f, version, n, k, "stop" if d else "length")
            for p, t, f, n, k, d in zip(
                prompts, out.texts, plan.fired, prompt_tokens, out.produced, out.ended, strict=True
            )
        ]
        return answers, out


__all__ = ["Answer", "QueryPlan", "Replica"]


def state_digest(version: int, method: str, artifacts: Iterable[Artifact | PackedArtifact]) -> str:
    """`Replica.digest` of a replica at `version` whose `method` applied `artifacts` in this order
    (a snapshot's capture and a heartbeat hash taken artifacts with no lock held)."""
    return hashlib.sha256(f"{version}:{edits_digest(method, artifacts)}".encode()).hexdigest()[:16]
