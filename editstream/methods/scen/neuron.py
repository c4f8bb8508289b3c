"""SCEN's indexing neurons: a prototype or two per fact, fitted against a bounded set of negatives.

A prototype neuron fires when a query's window feature (routing.py) has cosine with the mean of its
positives above a threshold: midway between the positives' lowest and the negatives' highest
cosine, but at least a floor (measured on CounterFact train rows: 0.75 inside a text; 0.95 for a
start prototype, whose exact match scores 1) and at most 0.95. A logistic neuron (a trained linear
unit) is the alternative; it over-fired on CounterFact (README, SCEN). Negatives are general text,
the prompt with other subjects swapped in, and the prototypes of the `max_negatives` nearest earlier
facts, so fitting costs the same at any history length (max_negatives=0, the published form, uses
every earlier fact).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editstream.errors import ArtifactError
from editstream.methods.scen.routing import Window

SCALE = 20.0  # prototype weights are unit vectors times this, so scores of different neurons compare


@dataclass
class Neuron:
    """Prototype weights (K, d), biases (K,) and each prototype's window; fires where w.x + b > 0."""

    weights: torch.Tensor
    biases: torch.Tensor
    windows: list[Window]

    def windows_meta(self) -> list[dict]:
        return [{"length": w.length, "start": w.start} for w in self.windows]

    @classmethod
    def from_tensors(cls, edit_id: str, w: torch.Tensor, b: torch.Tensor, meta: object, max_window: int) -> Neuron:
        """Rebuild from an artifact's tensors and its `windows` metadata, checking every window."""
        try:
            windows = [Window(int(x["length"]), bool(x["start"])) for x in meta]  # type: ignore[union-attr]
        except (TypeError, KeyError, ValueError):
            windows = []
        if not windows or not all(1 <= x.length <= max_window for x in windows):
            raise ArtifactError(
                f"artifact {edit_id}: neuron windows {meta!r}; expected a list of "
                f"{{'length': 1..{max_window}, 'start': true|false}}"
            )
        if w.numel() != len(windows) * w.shape[-1] or b.numel() != len(windows):
            raise ArtifactError(
                f"artifact {edit_id}: neuron tensors {tuple(w.shape)} and {tuple(b.shape)} do not match "
                f"{len(windows)} windows"
            )
        return cls(w.float().reshape(len(windows), -1), b.float().reshape(-1), windows)

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.weights, dim=-1)


def prototype_neuron(pos: torch.Tensor, neg: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b): the positives' normalised mean, and a threshold between them and the negatives (>= floor)."""
    pos, neg = F.normalize(pos.float(), dim=-1), F.normalize(neg.float(), dim=-1)
    proto = F.normalize(pos.mean(0), dim=-1)
    lo = float((pos @ proto).min())
    hi = float((neg @ proto).max()) if len(neg) else 0.0
    tau = min(0.95, max(floor, (lo + hi) / 2))
    return proto * SCALE, torch.tensor(-tau * SCALE)


def logistic_neuron(pos: torch.Tensor, neg: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b) of a logistic unit on normalised features: fire (> 0) on `pos`, stay silent on `neg`."""
    pos, neg = F.normalize(pos.float(), dim=-1), F.normalize(neg.float(), dim=-1)
    direction = pos.mean(0) - neg.mean(0)
    w = (direction / direction.norm().clamp_min(1e-6) * 10).clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    weight = torch.cat([torch.full((len(pos),), len(neg) / max(1, len(pos))), torch.ones(len(neg))])
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


class EarlierFacts:
    """Earlier facts' prototypes for negative mining; holds at most `capacity` facts (oldest dropped)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._protos: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._protos)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._protos

    def remember(self, edit_id: str, protos: torch.Tensor) -> None:
        self._protos[edit_id] = protos.float().cpu()
        self._protos.move_to_end(edit_id)
        while len(self._protos) > self.capacity:
            self._protos.popitem(last=False)

    def nearest(self, protos: torch.Tensor, exclude: str, k: int) -> torch.Tensor:
        """The `k` earlier prototypes (rows) most similar to any of `protos` (K, d); every one if k is 0."""
        rows = [p for e, p in self._protos.items() if e != exclude]
        if not rows:
            return protos.new_zeros(0, protos.shape[-1])
        earlier = torch.cat(rows).to(protos.device)
        if k and len(earlier) > k:
            earlier = earlier[(earlier @ protos.T).amax(1).topk(k).indices]
        return earlier

    def clear(self) -> None:
        self._protos.clear()


def fit_neuron(
    forms: list[tuple[torch.Tensor, Window]],
    negatives: Callable[[Window], torch.Tensor],
    fit: Callable[[torch.Tensor, torch.Tensor, Window], tuple[torch.Tensor, torch.Tensor]],
) -> Neuron:
    """One prototype per (positives (P, d), window) form, each fitted against `negatives(window)`."""
    weights, biases = [], []
    for positives, window in forms:
        w, b = fit(positives, negatives(window), window)
        weights.append(w)
        biases.append(b.reshape(()))
    return Neuron(torch.stack(weights), torch.stack(biases), [window for _, window in forms])
