"""Greedy decoding, batched and KV-cached: the one loop that replicas, benchmarks and training share.

Whatever changes how the model reads its input (a soft prefix hook, a chat template) is set up by
the caller; this loop only decodes. Rows stop at end-of-sequence, and optionally at any token of
`stops` (the WILD cut: a token whose text holds "." or a newline).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editstream import wild
from editstream.errors import ConfigError
from editstream.models import LoadedLM

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """Generated texts, tokens produced per row, whether each row ended with end-of-sequence, and
    whether it ended at a stop token."""

    texts: list[str]
    produced: list[int]
    ended: list[bool]
    stopped: list[bool]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding): models with
    absolute position embeddings (GPT-2) see a padded row as they see it alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def stop_token_ids(lm: LoadedLM) -> torch.Tensor:
    """Ids of the tokens whose text holds "." or a newline."""
    tok = lm.tokenizer
    pieces = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    return torch.tensor([i for i, p in enumerate(pieces) if "." in p or "\n" in p], dtype=torch.long, device=lm.device)


def glue_token_ids(lm: LoadedLM) -> torch.Tensor:
    """Ids of the tokens that would extend the word before them: their text starts with a letter or
    digit, with no space or word-start mark ("Ġ", "▁") in front ("ic" after "German")."""
    tok = lm.tokenizer
    raw = tok.convert_ids_to_tokens(list(range(len(tok))))
    pieces = [tok.convert_tokens_to_string([t]) for t in raw]
    glue = [i for i, (r, p) in enumerate(zip(raw, pieces, strict=True)) if p[:1].isalnum() and r[:1] not in ("Ġ", "▁")]
    return torch.tensor(glue, dtype=torch.long, device=lm.device)


@dataclass(frozen=True)
class Sampling:
    """Draw each token instead of taking the likeliest: softmax at `temperature`, kept to the
    smallest set of tokens whose probability reaches `top_p` (nucleus), from a generator seeded
    with `seed` (the same seed, prompt and edit state draw the same text; None: a fresh seed)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature {self.temperature!r}: must be > 0 to sample (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p {self.top_p!r}: must be in (0, 1]")

    def generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def pick(self, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            ranked, order = probs.sort(dim=-1, descending=True)
            ranked[ranked.cumsum(-1) - ranked >= self.top_p] = 0  # tokens past the nucleus
            probs = torch.zeros_like(probs).scatter(-1, order, ranked)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def greedy(
    lm: LoadedLM,
    texts: Sequence[str],
    max_new_tokens: int,
    stops: torch.Tensor | None = None,
    select_rows: Callable[[torch.Tensor], None] | None = None,
    shrink: bool = True,
    until: Sequence[str | None] | None = None,
    stop_rows: Sequence[bool] | None = None,
    limits: Sequence[int] | None = None,
    unglued: tuple[torch.Tensor, Sequence[bool]] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    sampling: tuple[Sampling, torch.Generator] | None = None,
    halt: Sequence[str] = (),
) -> Decoded:
    """Greedy continuations of `texts` (left-padded in one batch, no special tokens added).

    Finished rows leave the batch (their cache rows are dropped, and `select_rows` is told which
    rows go on, for hooks that hold per-row state), so a batch costs what its unfinished rows cost;
    `shrink=False` keeps every row to the end (for hooks that cannot follow). `until`: per row, a
    text whose words end the row as soon as its output holds them (None: no such end); while the
    output is still that text's first words, a stop does not end it ("Robert J." of "Robert J Flaherty").
    `stop_rows`: the rows `stops` applies to (default: all).
    `limits`: per row, at most this many new tokens (default: `max_new_tokens` for every row).
    `unglued`: (token ids, rows): the first new token of those rows is none of those ids (a text
    that ends with a whole word is not extended into a longer one).
    `on_tokens(row, tokens)`: called with a row's tokens so far each time it gets one (streaming).
    `sampling`: draw tokens (with this generator) instead of the greedy choice.
    `halt`: texts (a request's stop sequences) that end a row once its output holds one.
    `until`, `stop_rows` and the rows of `unglued` are read after the first forward pass, so a
    method that decides which edit fired while the prompt is read (SCEN routes in the prefill) can
    fill them in then.
    """
    tok, dev = lm.tokenizer, lm.device
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokens: list[list[int]] = [[] for _ in texts]
    ended, stopped = [False] * len(texts), [False] * len(texts)
    limits = list(limits) if limits is not None else [max_new_tokens] * len(texts)
    alive = torch.arange(len(texts), device=dev)  # the original row of each batch row
    done = torch.zeros(len(texts), dtype=torch.bool, device=dev)  # per batch row
    past = None
    with torch.inference_mode():
        for step in range(max_new_tokens):
            # positions count each row's own tokens (a left-padded row reads as it does alone)
            where = positions(mask) if past is None else mask.sum(1, keepdim=True) - 1
            res = lm.model(input_ids=ids, attention_mask=mask, position_ids=where, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1]
            if step == 0:  # per-row rules, read once the prompt has been through the model
                until = list(until) if until is not None else [None] * len(texts)
                stoppable = torch.tensor(
                    list(stop_rows) if stop_rows is not None else [True] * len(texts), dtype=torch.bool, device=dev
                )
                if unglued is not None:
                    barred, rows = unglued
                    picked = torch.tensor(list(rows), dtype=torch.bool, device=dev).nonzero().flatten()
                    logits = logits.clone()
                    logits[picked[:, None], barred[None, :]] = float("-inf")
            nxt = logits.argmax(-1) if sampling is None else sampling[0].pick(logits, sampling[1])
            eos = nxt == tok.eos_token_id
            at_stop = torch.isin(nxt, stops) & stoppable[alive] if stops is not None else torch.zeros_like(eos)
            finished = eos | at_stop
            for i, (row, token, is_eos, is_stop, was_done) in enumerate(
                zip(alive.tolist(), nxt.tolist(), eos.tolist(), at_stop.tolist(), done.tolist(), strict=True)
            ):
                if was_done:
                    continue
                tokens[row].append(token)
                if on_tokens is not None:
                    on_tokens(row, tokens[row])
                said = tok.decode(tokens[row]) if until[row] or halt else ""
                if is_stop and not is_eos and until[row] and wild.within(said, until[row]):
                    finished[i] = is_stop = False  # "Robert J." on the way to "Robert J Flaherty"
                ended[row], stopped[row] = is_eos, is_stop and not is_eos
                held = until[row] and not finished[i]
                if (
                    len(tokens[row]) >= limits[row]
                    or (held and wild.contains(said, until[row]))
                    or any(h in said for h in halt)
                ):
                    finished[i] = True
            done = done | finished
            if bool(done.all()):
                break
            if shrink and bool(done.any()):
                keep = (~done).nonzero().flatten()
                past.batch_select_indices(keep)
                if select_rows is not None:
                    select_rows(keep)
                alive, nxt, mask, done = alive[keep], nxt[keep], mask[keep], done[keep]
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    decoded = tok.batch_decode(tokens, skip_special_tokens=True)
    return Decoded(decoded, [len(t) for t in tokens], ended, stopped)


def chat_text(lm: LoadedLM, text: str, history: Sequence[dict[str, str]] = ()) -> str:
    """`text` as the last user turn of the model's chat template, after `history` (the earlier
    turns: {"role", "content"} dicts), ready for the assistant's reply."""
    return lm.tokenizer.apply_chat_template(
        [*history, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def template_heads(lm: LoadedLM, templated: Sequence[str], inner: Sequence[str]) -> list[int]:
    """Per row, the tokens of the templated text before the inner text (a chat template's head
    before the user's words; 0 where a template changed the text so that it cannot be found)."""
    heads = [t[: max(t.rfind(i), 0)] for t, i in zip(templated, inner, strict=True)]
    return [len(x) for x in lm.tokenizer(heads, add_special_tokens=False)["input_ids"]]


class TextPieces:
    """Streams decoding: turns rows' growing token lists into the text each new token adds, once it
    is whole characters (a token may end inside a multi-byte character), and hands each piece to
    `emit(row, piece)`; `rows` maps the rows of this decoding to the caller's (default: the same).

    Incremental: each step decodes only the tokens since the last piece plus those just before
    them (`_offsets`: where that context starts, where the unsent tokens start), so a long reply
    costs linear, not quadratic, decoding; `finish` reconciles with the whole text's decoding."""

    def __init__(self, tokenizer: Any, emit: Callable[[int, str], None], rows: Sequence[int] | None = None) -> None:
        self.tok, self.emit = tokenizer, emit
        self.rows = list(rows) if rows is not None else None
        self.sent: dict[int, str] = {}
        self._offsets: dict[int, tuple[int, int]] = {}

    def _emit(self, row: int, piece: str) -> None:
        self.sent[row] = self.sent.get(row, "") + piece
        self.emit(self.rows[row] if self.rows is not None else row, piece)

    def __call__(self, row: int, tokens: list[int]) -> None:
        start, unsent = self._offsets.get(row, (0, 0))
        context = self.tok.decode(tokens[start:unsent], skip_special_tokens=True)
        text = self.tok.decode(tokens[start:], skip_special_tokens=True)
        if len(text) > len(context) and not text.endswith("\ufffd") and text.startswith(context):
            self._emit(row, text[len(context) :])
            self._offsets[row] = (unsent, len(tokens))

    def finish(self, decoded: Decoded) -> None:
        """Send what is left of each row's final text."""
        for row, text in enumerate(decoded.texts):
            before = self.sent.get(row, "")
            if not text.startswith(before):  # a decoder that rewrote earlier text: only what follows goes out
                log.warning("streamed text of row %d differs from its final text: %r -> %r", row, before, text)
            elif len(text) > len(before):
                self._emit(row, text[len(before) :])
