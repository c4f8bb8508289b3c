"""What SCEN's indexing neurons read: windowed features of the routing layer's FFN input.

Each token's FFN input is centred on general text and normalised. The first token is an attention
sink: its state is nearly the same for every prompt (cosine 0.97 between different tokens at layer
6), so it is centred on the mean first-token state instead, which leaves what tells tokens apart
(a first "Thomas" then has cosine 0.63 with a later " Thomas", 0.1-0.2 with other names).
Padding counts as zero. A neuron keyed on a subject of L tokens reads, at each position, the
normalised mean of the L token features ending there, so it matches the whole subject span and not
only its last token: keyed on the last token alone, "Hack Wilson" fired the neuron of "William
Hardy Wilson" (a CounterFact train row, now held by a test in tests/test_scen.py). Window sums come
from one cumulative sum, so every window length costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """Where a prototype reads: the mean of `length` token features ending at any position, or (start)
    only the window made of a text's first `length` tokens."""

    length: int
    start: bool = False


@dataclass(frozen=True)
class Centers:
    """Means subtracted before normalising: of later tokens' states, and of first tokens' states."""

    token: torch.Tensor  # (d,)
    first: torch.Tensor  # (d,)

    @classmethod
    def fit(cls, x: torch.Tensor, mask: torch.Tensor) -> Centers:
        """From FFN inputs `x` (B, T, d) of general text with attention mask `mask` (B, T)."""
        first = first_tokens(mask)
        return cls(x[mask.bool() & ~first].float().mean(0), x[first].float().mean(0))


def first_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: each row's first real token under a (left-padded) attention mask."""
    mask = mask.bool()
    return mask & (mask.long().cumsum(1) == 1)


def offsets(mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each position's index within its text under a (left-padded) attention mask; -1 on padding."""
    return torch.where(mask.bool(), mask.long().cumsum(1) - 1, -1)


def token_features(x: torch.Tensor, centers: Centers, mask: torch.Tensor) -> torch.Tensor:
    """Per-token routing features (B, T, d): normalised and centred; zero where `mask` (B, T) is 0."""
    first = first_tokens(mask)[..., None]
    u = F.normalize(x.float() - torch.where(first, centers.first.float(), centers.token.float()), dim=-1)
    return u * mask[..., None].to(u.dtype)


class WindowSums:
    """Sums of the last L token features ending at each position, for any L up to `max_window`."""

    def __init__(self, u: torch.Tensor, max_window: int) -> None:
        pad = u.new_zeros(u.shape[0], max_window, u.shape[-1])
        self.cum = torch.cat([pad, u], dim=1).cumsum(1)  # (B, max_window + T, d)
        self.max_window = max_window

    def __call__(self, length: int) -> torch.Tensor:
        """Normalised window means (B, T, d) for windows of `length` tokens (cut at the row's start)."""
        if not 1 <= length <= self.max_window:
            raise ValueError(f"window length {length} outside 1..{self.max_window}")
        m = self.max_window
        return F.normalize(self.cum[:, m:] - self.cum[:, m - length : self.cum.shape[1] - length], dim=-1)


def reads_at(window: Window, where: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where a prototype with `window` reads among the positions `where`: all of them, or
    for a start window only where a text's first window.length tokens end (`offs`: offsets())."""
    return where & (offs == window.length - 1) if window.start else where


def windows_at(sums: WindowSums, mask: torch.Tensor, window: Window) -> torch.Tensor:
    """Features (N, d) of `window` wherever a prototype with it reads in the texts of `mask` (B, T)."""
    return sums(window.length)[reads_at(window, mask.bool(), offsets(mask))]
