"""Continuous-prompt prefixes: prepend per-row vectors to a causal LM's input embeddings.

`prepend_prefix` is the arithmetic (used directly in training); `soft_prefix` installs it as a
forward pre-hook for the duration of a `with` block, so serving code calls the model as usual and
the hook is always removed. Rows that get no prefix have their prefix slots masked out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def prepend_prefix(
    embeds: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, prefix_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask, position_ids) with `prefix` (B, l, d) before `embeds` (B, L, d)."""
    full = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
    full_mask = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
    positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    return full, full_mask, positions


def _past_length(past) -> int:
    if past is None:
        return 0
    return int(past.get_seq_length()) if hasattr(past, "get_seq_length") else int(past[0][0].shape[-2])


def insert_prefix(
    embeds: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, prefix_mask: torch.Tensor, at: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `prepend_prefix`, but row b's prefix goes before its token `at[b]` (an index into `embeds`)."""
    length, slots = embeds.shape[1], prefix.shape[1]
    j = torch.arange(length + slots, device=embeds.device)[None]
    at = at.to(embeds.device)[:, None]
    source = torch.where(j < at, j, torch.where(j < at + slots, length + j - at, j - slots))
    full = torch.cat([embeds, prefix.to(embeds.dtype)], dim=1)
    full = full.gather(1, source[..., None].expand(-1, -1, full.shape[-1]))
    full_mask = torch.cat([mask, prefix_mask.to(mask.dtype)], dim=1).gather(1, source)
    positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    return full, full_mask, positions


class PrefixRows:
    """The per-row prefix a `soft_prefix` hook adds; `select` follows a batch that drops rows.

    `offsets` (set before the first model call; default 0): per row, how many of its own tokens
    (padding not counted) come before the prefix, e.g. a chat template's head before the user turn.
    """

    def __init__(self, prefix: torch.Tensor, mask: torch.Tensor) -> None:
        self.prefix, self.mask = prefix, mask
        self.offsets: torch.Tensor | None = None
        self.first_mask: torch.Tensor | None = None  # the first call's mask, prefix slots included
        self.first_length = 0  # tokens of the first call's input (the prompt)

    def select(self, rows: torch.Tensor) -> None:
        self.prefix, self.mask = self.prefix[rows], self.mask[rows]
        if self.first_mask is not None:
            self.first_mask = self.first_mask[rows]


@contextmanager
def soft_prefix(model: torch.nn.Module, prefix: torch.Tensor, prefix_mask: torch.Tensor) -> Iterator[PrefixRows]:
    """While active, every call of `model` sees `prefix` inside its input: before the tokens, or
    after each row's first `offsets` tokens when the caller sets them on the yielded rows.

    The first call (no cache) swaps `input_ids` for embeddings with the prefix in place; later
    decoding calls (with a cache that already holds the prefix) get the mask and positions extended.
    Yields the rows' prefixes, whose `select` keeps them in step with a batch that drops rows.
    """
    embed = model.get_input_embeddings()
    rows = PrefixRows(prefix, prefix_mask)

    def hook(_module, args, kwargs):
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if _past_length(kwargs.get("past_key_values")) == 0:
            if rows.offsets is None:
                full, full_mask, positions = prepend_prefix(embed(ids), mask, rows.prefix, rows.mask)
            else:  # left padding: a row's own tokens start after its pads
                at = (mask.shape[1] - mask.sum(dim=1)) + rows.offsets.to(mask.device)
                full, full_mask, positions = insert_prefix(embed(ids), mask, rows.prefix, rows.mask, at)
            rows.first_mask, rows.first_length = full_mask, ids.shape[1]
            kwargs.update(inputs_embeds=full, attention_mask=full_mask, position_ids=positions)
        else:
            full_mask = torch.cat([rows.first_mask.to(mask.dtype), mask[:, rows.first_length :]], dim=1)
            positions = (full_mask.long().cumsum(-1) - 1)[:, -ids.shape[1] :]
            kwargs.update(input_ids=ids, attention_mask=full_mask, position_ids=positions)
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()
