"""All applied SCEN experts in preallocated tensors: routing and expert outputs without disk access.

Narrow and low-rank experts live in stacked tensors (one slot each; the bank doubles when full), so
routing a batch is one matrix product and applying experts one batched gather. Full experts (the
published form, an FFN copy each, 5 MB) are kept per slot in a dict: they are for side-by-side
measurement, not scale.
"""

from __future__ import annotations

import torch
from torch import nn

from editstream.methods.scen.expert import expert_output, new_expert, normalize


class ExpertBank:
    """Experts and neurons by slot; `route` picks one expert (or none) per row."""

    def __init__(
        self, kind: str, mlp: nn.Module, width: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.kind, self.mlp = kind, mlp
        self.device, self.dtype = device, dtype
        template = new_expert(kind, mlp, width)
        self.d = next(v for k, v in template.items() if k in ("w_in", "a_gate", "gate_proj")).shape[-1]
        self.shapes = {} if kind == "full" else {k: tuple(v.shape) for k, v in template.items()}
        self.stacked: dict[str, torch.Tensor] = {}
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.full: dict[int, dict[str, torch.Tensor]] = {}
        self.center = torch.zeros(self.d, device=device, dtype=dtype)  # subtracted from features before routing
        self.keys = torch.zeros(0, self.d, device=device, dtype=dtype)
        self.bias = torch.zeros(0, device=device, dtype=dtype)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        def grow(old: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
            new = torch.full((capacity, *shape), fill, device=self.device, dtype=self.dtype)
            new[: len(old)] = old
            return new

        old_cap = len(self.bias)
        self.keys = grow(self.keys, (self.d,))
        self.bias = grow(self.bias, (), float("-inf"))  # empty slots never fire
        for name, shape in self.shapes.items():
            old = self.stacked.get(name, torch.zeros(0, *shape, device=self.device, dtype=self.dtype))
            self.stacked[name] = grow(old, shape)
        self.free.extend(range(capacity - 1, old_cap - 1, -1))

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, edit_id: str, neuron_w: torch.Tensor, neuron_b: torch.Tensor, expert: dict) -> None:
        if not self.free:
            self._alloc(2 * len(self.bias))
        slot = self.free.pop()
        self.keys[slot] = neuron_w.to(self.device, self.dtype)
        self.bias[slot] = neuron_b.to(self.device, self.dtype)
        if self.shapes:
            for name in self.shapes:
                self.stacked[name][slot] = expert[name].to(self.device, self.dtype)
        else:
            self.full[slot] = {k: v.to(self.device, self.dtype) for k, v in expert.items()}
        self.slots[edit_id] = slot

    def remove(self, edit_id: str) -> None:
        slot = self.slots.pop(edit_id)
        self.bias[slot] = float("-inf")
        self.full.pop(slot, None)
        self.free.append(slot)

    def route(self, x: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of `x` (B, T, d): the slot whose neuron scores highest at any position in `where`
        (B, T), whether that score is above the threshold (0), and the position where it peaked."""
        scores = normalize(x - self.center.to(x.dtype)).to(self.dtype) @ self.keys.T + self.bias  # (B, T, slots)
        scores = scores.masked_fill(~where[..., None], float("-inf"))
        best, flat = scores.flatten(1).max(-1)
        n = len(self.bias)
        return flat % n, best > 0, torch.div(flat, n, rounding_mode="floor")

    def output(self, slots: torch.Tensor, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """FFN outputs for rows `x` (R, T, d) with experts `slots` (R,) in effect; `base` is the plain output."""
        if self.shapes:
            experts = {name: t[slots] for name, t in self.stacked.items()}  # (R, ...): one expert per row
            return expert_output(self.kind, experts, x, base, self.mlp, batched=True)
        rows = [
            expert_output("full", self.full[int(s)], x[i : i + 1], base[i : i + 1], self.mlp)
            for i, s in enumerate(slots)
        ]
        return torch.cat(rows)

    def slot_edit_ids(self) -> dict[int, str]:
        return {s: e for e, s in self.slots.items()}
