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


class PrefixRows:
    """The per-row prefix a `soft_prefix` hook adds; `select` follows a batch that drops rows."""

    def __init__(self, prefix: torch.Tensor, mask: torch.Tensor) -> None:
        self.prefix, self.mask = prefix, mask

    def select(self, rows: torch.Tensor) -> None:
        self.prefix, self.mask = self.prefix[rows], self.mask[rows]


@contextmanager
def soft_prefix(model: torch.nn.Module, prefix: torch.Tensor, prefix_mask: torch.Tensor) -> Iterator[PrefixRows]:
    """While active, every call of `model` sees `prefix` before its input tokens.

    The first call (no cache) swaps `input_ids` for embeddings with the prefix in front; later
    decoding calls (with a cache that already holds the prefix) get the mask and positions extended.
    Yields the rows' prefixes, whose `select` keeps them in step with a batch that drops rows.
    """
    embed = model.get_input_embeddings()
    rows = PrefixRows(prefix, prefix_mask)

    def hook(_module, args, kwargs):
        prefix, prefix_mask = rows.prefix, rows.mask
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if _past_length(kwargs.get("past_key_values")) == 0:
            full, full_mask, positions = prepend_prefix(embed(ids), mask, prefix, prefix_mask)
            kwargs.update(inputs_embeds=full, attention_mask=full_mask, position_ids=positions)
        else:
            full_mask = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
            positions = (full_mask.long().cumsum(-1) - 1)[:, -ids.shape[1] :]
            kwargs.update(input_ids=ids, attention_mask=full_mask, position_ids=positions)
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()
