"""Greedy decoding, batched and KV-cached: the one loop that replicas, benchmarks and training share.

Whatever changes how the model reads its input (a soft prefix hook, a chat template) is set up by
the caller; this loop only decodes. Rows stop at end-of-sequence, and optionally at any token of
`stops` (the WILD cut: a token whose text holds "." or a newline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editstream import wild
from editstream.models import LoadedLM


@dataclass
class Decoded:
    """Generated texts, tokens produced per row, whether each row ended with end-of-sequence, and
    whether it ended at a stop token."""

    texts: list[str]
    produced: list[int]
    ended: list[bool]
    stopped: list[bool]


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
) -> Decoded:
    """Greedy continuations of `texts` (left-padded in one batch, no special tokens added).

    Finished rows leave the batch (their cache rows are dropped, and `select_rows` is told which
    rows go on, for hooks that hold per-row state), so a batch costs what its unfinished rows cost;
    `shrink=False` keeps every row to the end (for hooks that cannot follow). `until`: per row, a
    text whose words end the row as soon as its output holds them (None: no such end).
    `stop_rows`: the rows `stops` applies to (default: all).
    `limits`: per row, at most this many new tokens (default: `max_new_tokens` for every row).
    `unglued`: (token ids, rows): the first new token of those rows is none of those ids (a text
    that ends with a whole word is not extended into a longer one).
    """
    tok, dev = lm.tokenizer, lm.device
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokens: list[list[int]] = [[] for _ in texts]
    ended, stopped = [False] * len(texts), [False] * len(texts)
    until = list(until) if until is not None else [None] * len(texts)
    limits = list(limits) if limits is not None else [max_new_tokens] * len(texts)
    stoppable = torch.tensor(list(stop_rows) if stop_rows is not None else [True] * len(texts), device=dev)
    alive = torch.arange(len(texts), device=dev)  # the original row of each batch row
    done = torch.zeros(len(texts), dtype=torch.bool, device=dev)  # per batch row
    past = None
    with torch.inference_mode():
        for step in range(max_new_tokens):
            res = lm.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1]
            if unglued is not None and step == 0:
                barred, rows = unglued
                picked = torch.tensor(list(rows), dtype=torch.bool, device=dev).nonzero().flatten()
                logits = logits.clone()
                logits[picked[:, None], barred[None, :]] = float("-inf")
            nxt = logits.argmax(-1)
            eos = nxt == tok.eos_token_id
            at_stop = torch.isin(nxt, stops) & stoppable[alive] if stops is not None else torch.zeros_like(eos)
            finished = eos | at_stop
            for i, (row, token, is_eos, is_stop, was_done) in enumerate(
                zip(alive.tolist(), nxt.tolist(), eos.tolist(), at_stop.tolist(), done.tolist(), strict=True)
            ):
                if was_done:
                    continue
                tokens[row].append(token)
                ended[row], stopped[row] = is_eos, is_stop and not is_eos
                if (
                    len(tokens[row]) >= limits[row]
                    or not finished[i]
                    and until[row]
                    and wild.contains(tok.decode(tokens[row]), until[row])
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


def chat_text(lm: LoadedLM, text: str) -> str:
    """`text` as the user turn of the model's chat template, ready for the assistant's reply."""
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
