"""Editing metrics: teacher-forced token accuracy, locality agreement, generation exact match.

Scores follow RECIPE/WISE: the model reads context + answer tokens in one pass (teacher forcing)
and we compare its argmax at each answer position with the answer token (accuracy) or with the
unedited model's argmax there (locality agreement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """Left-padded context+answer token ids, with where each answer's tokens sit."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    answer_ids: list[list[int]]
    answer_start: list[int]  # index in input_ids of the first answer token, per row


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into one (B, L) batch of ids, with the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def encode_pairs(tokenizer, contexts: Sequence[str], answers: Sequence[str]) -> PairBatch:
    """Tokenize (context, " " + answer) pairs without special tokens, left-padded into one batch. A blank
    answer adds no tokens: the row is its context alone (whose last position predicts what follows)."""
    rows, answer_ids = [], []
    for ctx, ans in zip(contexts, answers, strict=True):
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + ans.strip(), add_special_tokens=False)["input_ids"] if ans.strip() else []
        rows.append(c + a)
        answer_ids.append(a)
    ids, mask = left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    starts = [ids.shape[1] - len(a) for a in answer_ids]
    return PairBatch(ids, mask, answer_ids, starts)


def answer_predictions(logits: torch.Tensor, batch: PairBatch) -> list[list[int]]:
    """Argmax token at each answer position: logits at t-1 predict the token at t.

    `logits` may cover only the last K positions of the batch (answers are right-aligned).
    """
    preds = logits.argmax(-1)
    offset = batch.input_ids.shape[1] - logits.shape[1]
    out = []
    for i, (start, ans) in enumerate(zip(batch.answer_start, batch.answer_ids, strict=True)):
        out.append(preds[i, start - 1 - offset : start - 1 - offset + len(ans)].tolist())
    return out


def positions_to_score(batch: PairBatch) -> int:
    """How many final positions hold every answer's predicting logits (left-padded batch)."""
    return max(len(a) for a in batch.answer_ids) + 1


def token_accuracy(predicted: Sequence[int], answer: Sequence[int]) -> float:
    """Share of answer tokens the model predicted (teacher-forced)."""
    if len(predicted) != len(answer):
        raise ValueError(f"length mismatch: {len(predicted)} predictions for {len(answer)} answer tokens")
    if not answer:
        return 1.0
    return sum(int(p == a) for p, a in zip(predicted, answer, strict=True)) / len(answer)


def agreement(edited: Sequence[int], unedited: Sequence[int]) -> float:
    """Locality: share of positions where the edited model's argmax equals the unedited model's."""
    return token_accuracy(edited, unedited)


def exact_match(generated: str, target: str) -> bool:
    """Whether a greedy generation starts with the target (case and surrounding space ignored)."""
    return generated.strip().casefold().startswith(target.strip().casefold())


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; nan for no values."""
    return float(sum(values) / len(values)) if values else float("nan")
