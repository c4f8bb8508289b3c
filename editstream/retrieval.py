"""A removable vector index of edit keys: faiss inner product under an ID map, keyed by edit_id.

Flat search is exact and supports `remove_ids`, which supersede and retract need; keys are small
(the retriever projects to `key_dim`), so a flat scan over 100k keys stays in the low milliseconds.
"""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import torch


class KeyIndex:
    """Edit keys by edit_id, searchable by inner product; add and remove are idempotent."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids = itertools.count(1)
        self._by_edit: dict[str, int] = {}
        self._by_int: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._by_edit)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._by_edit

    def add(self, edit_id: str, key: torch.Tensor) -> None:
        if edit_id in self._by_edit:
            return
        vec = key.detach().float().cpu().numpy().reshape(1, self.dim)
        n = next(self._ids)
        self._index.add_with_ids(np.ascontiguousarray(vec), np.array([n], dtype=np.int64))
        self._by_edit[edit_id] = n
        self._by_int[n] = edit_id

    def remove(self, edit_id: str) -> None:
        n = self._by_edit.pop(edit_id, None)
        if n is None:
            return
        del self._by_int[n]
        self._index.remove_ids(np.array([n], dtype=np.int64))

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Best score and edit_id per query row; (-inf, None) where the index is empty."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if not self._by_edit:
            return torch.full((len(q),), float("-inf")), [None] * len(q)
        scores, ids = self._index.search(q, 1)
        return torch.from_numpy(scores[:, 0].copy()), [self._by_int.get(int(i)) for i in ids[:, 0]]
