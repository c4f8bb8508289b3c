"""What should follow an edited answer: the unedited model reading the plain statement is the teacher.

For each (context, target), the frozen LLM reads "context target" as ordinary text and continues
it greedily for `k` tokens; its next-token distributions along that continuation are the teacher.
The edited model (prefix + context + target + the same continuation) is trained to match them, so
after the answer it goes on as a model that simply knows the fact would: a full stop, a clause,
a new sentence, and not a copy of what followed the target inside the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editstream.metrics import left_pad
from editstream.models import LoadedLM


@dataclass
class Continuations:
    """Token rows "context target continuation" and the teacher's log-probabilities along them."""

    rows: list[list[int]]  # context + target + continuation[:-1]: what the student reads
    positions: list[list[int]]  # per row, the indices whose logits predict the continuation
    teacher: torch.Tensor  # (sum of positions, vocab) log-probabilities, in row order


def pair_ids(lm: LoadedLM, context: str, answer: str, lead: str = " ") -> tuple[list[int], list[int]]:
    """Token ids of a context and of `lead` + answer, tokenised apart (as `encode_pairs` does); a
    chat reply starts on its own line, with no space (lead "")."""
    tok = lm.tokenizer
    return tok(context, add_special_tokens=False)["input_ids"], tok(lead + answer.strip(), add_special_tokens=False)[
        "input_ids"
    ]


@torch.no_grad()
def teacher_continuations(
    lm: LoadedLM, contexts: Sequence[str], targets: Sequence[str], k: int, leads: Sequence[str] | None = None
) -> tuple[Continuations, list[int]]:
    """Greedy k-token continuations of each plain "context target" and the teacher's log-probs;
    also the number of context + target tokens per row (where the target ends). leads: what goes
    between each context and its target (default " ")."""
    tok, dev = lm.tokenizer, lm.device
    leads = leads or [" "] * len(contexts)
    heads = [sum(pair_ids(lm, c, t, d), []) for c, t, d in zip(contexts, targets, leads, strict=True)]
    ids, mask = left_pad(heads, tok.pad_token_id if tok.pad_token_id is not None else 0)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    steps_logp, steps_tok, past = [], [], None
    for _ in range(k):
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logp = out.logits[:, -1].float().log_softmax(-1)
        nxt = logp.argmax(-1)
        steps_logp.append(logp)
        steps_tok.append(nxt)
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    conts = torch.stack(steps_tok, dim=1).tolist()  # (B, k)
    logps = torch.stack(steps_logp, dim=1)  # (B, k, V)
    rows = [h + c[:-1] for h, c in zip(heads, conts, strict=True)]
    positions = [list(range(len(h) - 1, len(h) - 1 + k)) for h in heads]
    teacher = logps.reshape(-1, logps.shape[-1])
    return Continuations(rows, positions, teacher), [len(h) for h in heads]
