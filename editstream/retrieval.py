"""Removable vector indexes of edit keys, keyed by edit_id: exact inner-product search.

* `KeyIndex`: faiss flat inner product (CPU), rows as slots: a removed key is overwritten with a
  tombstone and its slot reused, so supersede and retract cost O(1), not a compaction of the whole
  array. Flat search is exact; keys are small (the retriever projects to `key_dim`), so a flat scan
  over 100k keys stays in the low milliseconds.
* `TensorKeyIndex`: the same as one matrix product on the model's device (a GPU replica keeps its
  keys in GPU memory next to the model: no host round trip per query). Rows live in a preallocated
  tensor that doubles when full; a removed row is masked and reused.
`make_index` picks the tensor index on CUDA and faiss on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch


class _EditSlots:
    """edit_id -> slot (a faiss id or a tensor row): what both indexes count and look up."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._by_edit: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_edit)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._by_edit


class KeyIndex(_EditSlots):
    """Edit keys by edit_id, searchable by inner product; add and remove are idempotent and O(1).

    A faiss flat index whose rows are slots: a removed edit's row is overwritten in place with a
    tombstone and its slot reused by the next add (faiss's own `remove_ids` compacts the whole array,
    ~9 ms per call at 100k keys: quadratic over a stream of supersedes and retracts). Rows carry one
    extra dimension, 0 for keys and -1e9 for tombstones, and queries a 1 there, so a live key scores
    exactly its inner product and a tombstone never wins while any key is live."""

    TOMBSTONE = -1e9

    def __init__(self, dim: int) -> None:
        import faiss  # here, not at the top: a GPU replica (tensor index) needs no faiss

        super().__init__(dim)
        self._faiss = faiss
        self._index = faiss.IndexFlatIP(dim + 1)
        self._slots: list[str | None] = []  # slot -> edit_id (None: a tombstone, free for reuse)
        self._free: list[int] = []

    def _row(self, slot: int) -> np.ndarray:
        """A writable view of one stored row (faiss keeps the flat array contiguous)."""
        width = self.dim + 1
        rows = self._faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * width)
        return rows[slot * width : (slot + 1) * width]

    def add(self, edit_id: str, key: torch.Tensor) -> None:
        if edit_id in self._by_edit:
            return
        vec = np.zeros(self.dim + 1, dtype=np.float32)
        vec[: self.dim] = key.detach().float().cpu().numpy().reshape(self.dim)
        if self._free:
            slot = self._free.pop()
            self._row(slot)[:] = vec
            self._slots[slot] = edit_id
        else:
            slot = len(self._slots)
            self._index.add(vec.reshape(1, -1))
            self._slots.append(edit_id)
        self._by_edit[edit_id] = slot

    def remove(self, edit_id: str) -> None:
        slot = self._by_edit.pop(edit_id, None)
        if slot is None:
            return
        row = self._row(slot)
        row[:] = 0.0
        row[self.dim] = self.TOMBSTONE
        self._slots[slot] = None
        self._free.append(slot)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Best score and edit_id per query row; (-inf, None) where the index is empty."""
        q = queries.detach().float().cpu().numpy()
        if not self._by_edit:
            return torch.full((len(q),), float("-inf")), [None] * len(q)
        q = np.ascontiguousarray(np.concatenate([q, np.ones((len(q), 1), dtype=np.float32)], axis=1))
        scores, slots = self._index.search(q, 1)
        return torch.from_numpy(scores[:, 0].copy()), [self._slots[int(i)] for i in slots[:, 0]]


class TensorKeyIndex(_EditSlots):
    """Edit keys in one tensor on `device`; same interface and results as `KeyIndex`."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        super().__init__(dim)
        self.device = torch.device(device)
        self._keys = torch.zeros(capacity, dim, device=self.device)
        self._live = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._by_row: dict[int, str] = {}
        self._free: list[int] = []
        self._used = 0  # rows ever handed out (the search scans only these)

    def add(self, edit_id: str, key: torch.Tensor) -> None:
        if edit_id in self._by_edit:
            return
        if self._free:
            row = self._free.pop()
        else:
            if self._used == len(self._keys):
                self._grow()
            row, self._used = self._used, self._used + 1
        self._keys[row] = key.detach().reshape(self.dim).to(self._keys)
        self._live[row] = True
        self._by_edit[edit_id] = row
        self._by_row[row] = edit_id

    def _grow(self) -> None:
        n = len(self._keys)
        self._keys = torch.cat([self._keys, torch.zeros_like(self._keys)])
        self._live = torch.cat([self._live, torch.zeros(n, dtype=torch.bool, device=self.device)])

    def remove(self, edit_id: str) -> None:
        row = self._by_edit.pop(edit_id, None)
        if row is None:
            return
        del self._by_row[row]
        self._live[row] = False
        self._free.append(row)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Best score and edit_id per query row; (-inf, None) where the index is empty."""
        q = queries.detach().to(self._keys).reshape(-1, self.dim)
        if not self._by_edit:
            return torch.full((len(q),), float("-inf")), [None] * len(q)
        scores = q @ self._keys[: self._used].T
        scores.masked_fill_(~self._live[: self._used], float("-inf"))
        best, rows = scores.max(dim=1)
        return best.cpu(), [self._by_row.get(int(r)) for r in rows.tolist()]


def make_index(dim: int, device: torch.device | str = "cpu") -> KeyIndex | TensorKeyIndex:
    """The tensor index on a CUDA device (keys beside the model), faiss on the CPU."""
    return TensorKeyIndex(dim, device) if torch.device(device).type == "cuda" else KeyIndex(dim)
