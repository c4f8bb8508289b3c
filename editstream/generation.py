"""Greedy decoding, batched and KV-cached: the one loop that replicas, benchmarks and training share.

Whatever changes how the model reads its input (a soft prefix hook, a chat template) is set up by
the caller; this loop only decodes. Rows stop at end-of-sequence, and optionally at any token of
`stops` (the WILD cut: a token whose text holds "." or a newline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editstream.models import LoadedLM


@dataclass
class Decoded:
    """Generated texts, tokens produced per row, and whether each row ended with end-of-sequence."""

    texts: list[str]
    produced: list[int]
    ended: list[bool]


def stop_token_ids(lm: LoadedLM) -> torch.Tensor:
    """Ids of the tokens whose text holds "." or a newline."""
    tok = lm.tokenizer
    pieces = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    return torch.tensor([i for i, p in enumerate(pieces) if "." in p or "\n" in p], dtype=torch.long, device=lm.device)


def greedy(lm: LoadedLM, texts: Sequence[str], max_new_tokens: int, stops: torch.Tensor | None = None) -> Decoded:
    """Greedy continuations of `texts` (left-padded in one batch, no special tokens added)."""
    tok, dev = lm.tokenizer, lm.device
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    out = torch.empty(len(texts), 0, dtype=torch.long, device=dev)
    past, done = None, torch.zeros(len(texts), dtype=torch.bool, device=dev)
    ended = torch.zeros(len(texts), dtype=torch.bool, device=dev)
    produced = torch.zeros(len(texts), dtype=torch.long, device=dev)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = lm.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            produced += ~done
            ended |= ~done & (nxt == tok.eos_token_id)
            done |= nxt == tok.eos_token_id
            if stops is not None:
                done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return Decoded(tok.batch_decode(out, skip_special_tokens=True), produced.tolist(), ended.tolist())


def chat_text(lm: LoadedLM, text: str) -> str:
    """`text` as the user turn of the model's chat template, ready for the assistant's reply."""
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
