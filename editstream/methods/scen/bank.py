"""All applied SCEN experts in preallocated tensors: routing and expert outputs without disk access.

Each slot holds one expert and its indexing neuron. A neuron has up to PROTOTYPES prototypes (the
subject as it starts a text and as it appears inside one tokenize differently, so each gets its
own), each a unit vector, a threshold and a window: a length in tokens, and whether it is read only
where a text's first tokens end (a start prototype) or anywhere. Narrow and low-rank experts live in
stacked tensors (the bank doubles when full), so routing a batch is one matrix product per window
length and applying experts one batched gather. Full experts (the published form, an FFN copy
each, 5 MB) are kept per slot in a dict: they are for side-by-side measurement, not scale.
"""

from __future__ import annotations

import torch
from torch import nn

from editstream.methods.scen.expert import expert_output, new_expert
from editstream.methods.scen.routing import Window, WindowSums, reads_at

PROTOTYPES = 2  # per neuron, at most


class ExpertBank:
    """Experts and neurons by slot; `route` picks one expert (or none) per row."""

    def __init__(
        self, kind: str, mlp: nn.Module, width: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.kind, self.mlp = kind, mlp
        self.device, self.dtype = device, dtype  # routing (prototypes, thresholds)
        self.expert_dtype = next(mlp.parameters()).dtype  # experts act as the FFN does (bf16 too)
        template = new_expert(kind, mlp, width)
        self.d = next(v for k, v in template.items() if k in ("w_in", "a_gate", "gate_proj")).shape[-1]
        self.shapes = {} if kind == "full" else {k: tuple(v.shape) for k, v in template.items()}
        self.stacked: dict[str, torch.Tensor] = {}
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.full: dict[int, dict[str, torch.Tensor]] = {}
        self.keys = torch.zeros(0, PROTOTYPES, self.d, device=device, dtype=dtype)
        self.bias = torch.zeros(0, PROTOTYPES, device=device, dtype=dtype)
        self.windows: dict[int, list[Window]] = {}  # slot -> its prototypes' windows
        self._groups: dict[Window, torch.Tensor] | None = None  # window -> flat prototype rows (cached)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        def grow(old: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
            new = torch.full((capacity, *shape), fill, device=self.device, dtype=old.dtype)
            new[: len(old)] = old
            return new

        old_cap = len(self.bias)
        self.keys = grow(self.keys, (PROTOTYPES, self.d))
        self.bias = grow(self.bias, (PROTOTYPES,), float("-inf"))  # empty slots and prototypes never fire
        for name, shape in self.shapes.items():
            old = self.stacked.get(name, torch.zeros(0, *shape, device=self.device, dtype=self.expert_dtype))
            self.stacked[name] = grow(old, shape)
        self.free.extend(range(capacity - 1, old_cap - 1, -1))
        self._groups = None

    def __len__(self) -> int:
        return len(self.slots)

    def add(
        self, edit_id: str, neuron_w: torch.Tensor, neuron_b: torch.Tensor, windows: list[Window], expert: dict
    ) -> None:
        """Put an expert and its neuron (prototypes `neuron_w` (K, d), thresholds `neuron_b` (K,), one
        window each, K <= PROTOTYPES) in a free slot."""
        k = len(windows)
        if not 1 <= k <= PROTOTYPES or neuron_w.shape != (k, self.d) or neuron_b.shape != (k,):
            raise ValueError(
                f"neuron of {edit_id}: weights {tuple(neuron_w.shape)}, bias {tuple(neuron_b.shape)} and "
                f"{k} windows; expected (K, {self.d}), (K,) and K windows with 1 <= K <= {PROTOTYPES}"
            )
        if not self.free:
            self._alloc(2 * len(self.bias))
        slot = self.free.pop()
        self.keys[slot, :k] = neuron_w.to(self.device, self.dtype)
        self.bias[slot, :k] = neuron_b.to(self.device, self.dtype)
        if self.shapes:
            for name in self.shapes:
                self.stacked[name][slot] = expert[name].to(self.device, self.expert_dtype)
        else:
            self.full[slot] = {k: v.to(self.device, self.expert_dtype) for k, v in expert.items()}
        self.slots[edit_id] = slot
        self.windows[slot] = list(windows)
        self._groups = None

    def remove(self, edit_id: str) -> None:
        slot = self.slots.pop(edit_id)
        self.bias[slot] = float("-inf")
        self.full.pop(slot, None)
        self.windows.pop(slot)
        self._groups = None
        self.free.append(slot)

    def groups(self) -> dict[Window, torch.Tensor]:
        """Flat prototype rows (slot * PROTOTYPES + k) of occupied slots, by window."""
        if self._groups is None:
            by: dict[Window, list[int]] = {}
            for slot, windows in self.windows.items():
                for k, window in enumerate(windows):
                    by.setdefault(window, []).append(slot * PROTOTYPES + k)
            order = sorted(by, key=lambda w: (w.length, w.start))
            self._groups = {w: torch.tensor(sorted(by[w]), device=self.device) for w in order}
        return self._groups

    def route(
        self, sums: WindowSums, where: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row (B rows of T positions): the slot with the highest-scoring prototype on its window of
        token features (`sums`) ending at a position in `where` (B, T) (for start prototypes: only the
        position whose offset in its text, `offsets` (B, T), is the window length - 1), whether that
        score is above the threshold (0), and the position where it peaked."""
        keys, bias = self.keys.flatten(0, 1), self.bias.flatten()
        n = len(bias)
        scores = torch.full((*where.shape, n), float("-inf"), device=where.device, dtype=self.dtype)  # (B, T, rows)
        for window, rows in self.groups().items():
            s = sums(window.length).to(self.dtype) @ keys[rows].T + bias[rows]
            scores[..., rows] = s.masked_fill(~reads_at(window, where, offsets)[..., None], float("-inf"))
        best, flat = scores.flatten(1).max(-1)
        slot = torch.div(flat % n, PROTOTYPES, rounding_mode="floor")
        return slot, best > 0, torch.div(flat, n, rounding_mode="floor")

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
