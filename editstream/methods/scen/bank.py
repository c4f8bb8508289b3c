"""All applied SCEN experts in preallocated tensors: routing and expert outputs without disk access.

Narrow experts live in stacked tensors (slots; the bank doubles when full), so routing a batch is
one matrix product and applying experts one batched gather. Full experts (the published form, an
FFN copy each) are kept per slot in a dict: they are for side-by-side measurement, not scale.
"""

from __future__ import annotations

import torch

from editstream.methods.scen.expert import expert_output, normalize

NARROW = ("w_in", "b_in", "w_out")


class ExpertBank:
    """Experts and neurons by slot; `route` picks one expert (or none) per row."""

    def __init__(self, kind: str, d: int, width: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.kind, self.d, self.width = kind, d, width
        self.device, self.dtype = device, dtype
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.full: dict[int, dict[str, torch.Tensor]] = {}
        self.center = torch.zeros(d, device=device, dtype=dtype)  # subtracted from features before routing
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        def grow(old: torch.Tensor | None, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
            new = torch.full((capacity, *shape), fill, device=self.device, dtype=self.dtype)
            if old is not None:
                new[: len(old)] = old
            return new

        old_cap = len(self.bias) if hasattr(self, "bias") else 0
        prev = getattr
        self.keys = grow(prev(self, "keys", None), (self.d,))
        self.bias = grow(prev(self, "bias", None), (), float("-inf"))  # empty slots never fire
        if self.kind == "narrow":
            self.w_in = grow(prev(self, "w_in", None), (self.width, self.d))
            self.b_in = grow(prev(self, "b_in", None), (self.width,))
            self.w_out = grow(prev(self, "w_out", None), (self.d, self.width))
        self.free.extend(range(capacity - 1, old_cap - 1, -1))

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, edit_id: str, neuron_w: torch.Tensor, neuron_b: torch.Tensor, expert: dict) -> None:
        if not self.free:
            self._alloc(2 * len(self.bias))
        slot = self.free.pop()
        self.keys[slot] = neuron_w.to(self.device, self.dtype)
        self.bias[slot] = neuron_b.to(self.device, self.dtype)
        if self.kind == "narrow":
            for name in NARROW:
                getattr(self, name)[slot] = expert[name].to(self.device, self.dtype)
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
        if self.kind == "narrow":
            expert = {name: getattr(self, name)[slots] for name in NARROW}  # (R, ...)
            h = torch.nn.functional.silu(torch.einsum("rtd,rkd->rtk", x, expert["w_in"]) + expert["b_in"][:, None])
            return base + torch.einsum("rtk,rdk->rtd", h, expert["w_out"])
        rows = [expert_output("full", self.full[int(s)], x[i : i + 1], base[i : i + 1]) for i, s in enumerate(slots)]
        return torch.cat(rows)

    def slot_edit_ids(self) -> dict[int, str]:
        return {s: e for e, s in self.slots.items()}
