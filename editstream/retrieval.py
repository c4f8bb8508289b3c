"""Removable vector indexes of edit keys, keyed by edit_id: exact inner-product search.

* `KeyIndex`: faiss flat inner product (CPU), rows as slots: a removed key is overwritten with a
  tombstone and its slot reused, so supersede and retract cost O(1), not a compaction of the whole
  array. Flat search is exact; keys are small (the retriever projects to `key_dim`), so a flat scan
  over 100k keys stays in the low milliseconds.
* `IvfKeyIndex`: faiss inverted lists (keys in float16, inner product): a query scans the `nprobe` lists
  whose centroids are nearest to it instead of every key, so search cost stops growing with the
  count; approximate (a key in an unprobed list is missed). A remove takes the key out of its list.
* `ScalingKeyIndex`: flat (exact) up to `threshold` keys, then IVF trained on the keys it holds,
  trained again each time the count has grown `regrow`-fold since; by default on a thread beside
  the caller, the current index serving meanwhile (the changes made meanwhile replayed onto the new).
* `TensorKeyIndex`: the same as one matrix product on the model's device (a GPU replica keeps its
  keys in GPU memory next to the model: no host round trip per query). Rows live in a preallocated
  tensor that doubles when full; a removed row is masked and reused.
`make_index` picks the tensor index on CUDA and faiss on the CPU (IVF past `ann_threshold`, if set).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

log = logging.getLogger(__name__)

# IVF lists scanned per query. On 24,500 RECIPE keys of the benchmark sets and train splits (126
# lists), the best key agrees with exact search for 0.975 of prompts and paraphrases with 16 lists,
# 0.993 with 32 and 0.999 with 64 (`editstream bench recall`, bench/results/scale/).
DEFAULT_NPROBE = 64

# RECIPE and text-RAG move their keys to IVF at this many (0: always flat). With 1,000,000 stored
# edits, 64 lists probed, a searched query took 1.088x the unedited model's time on 2 cores, where a
# flat scan of a million keys alone costs ~75 ms (`editstream bench cost`, bench/results/scale/).
DEFAULT_ANN_THRESHOLD = 100_000


_CHUNK = 8192  # rows per bulk step that holds the interpreter lock


class _EditSlots:
    """edit_id -> slot (a faiss id or a tensor row): what both indexes count and look up."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._by_edit: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_edit)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._by_edit

    def add_many(self, edit_ids: list[str], keys: torch.Tensor) -> None:
        """`add` for each (edit id, key row); indexes that can do better override it."""
        for edit_id, key in zip(edit_ids, keys, strict=True):
            self.add(edit_id, key)

    def training(self) -> dict[str, torch.Tensor]:
        """What this index learned from its keys (none: an exact index learns nothing)."""
        return {}

    def seed(self, training: dict[str, torch.Tensor]) -> None:
        """Take `training` (another index's `training()`) instead of learning it again (ignored here)."""

    def frozen_keys(self) -> Callable[[], tuple[list[str], np.ndarray]]:
        raise NotImplementedError

    def live_keys(self) -> tuple[list[str], np.ndarray]:
        """The live edit ids and their keys (float32, one row each)."""
        return self.frozen_keys()()


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

    def add_many(self, edit_ids: list[str], keys: torch.Tensor) -> None:
        """Free slots first, one at a time; the rest appended in one faiss call (a snapshot's keys)."""
        fresh = {e: r for r, e in enumerate(edit_ids) if e not in self._by_edit}  # last row of a repeated id
        rows = list(fresh.values())
        reused = min(len(self._free), len(rows))
        for r in rows[:reused]:
            self.add(edit_ids[r], keys[r])
        rows = rows[reused:]
        if not rows:
            return
        vecs = np.zeros((len(rows), self.dim + 1), dtype=np.float32)
        vecs[:, : self.dim] = keys[rows].detach().float().cpu().numpy().reshape(len(rows), self.dim)
        start = len(self._slots)
        self._index.add(vecs)
        for offset, r in enumerate(rows):
            self._slots.append(edit_ids[r])
            self._by_edit[edit_ids[r]] = start + offset

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

    def frozen_keys(self) -> Callable[[], tuple[list[str], np.ndarray]]:
        """`live_keys` as of now, read later (taken now: a flat index holds at most an ANN threshold's keys)."""
        width = self.dim + 1
        rows = self._faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * width).reshape(-1, width)
        live = [slot for slot, edit_id in enumerate(self._slots) if edit_id is not None]
        found = [self._slots[slot] for slot in live], np.ascontiguousarray(rows[live, : self.dim])
        return lambda: found


class IvfKeyIndex(_EditSlots):
    """Edit keys in faiss inverted lists (inner product), trained on the keys it starts with.

    About sqrt(n) lists (k-means on at most 64 keys per list); a query scans the `nprobe` nearest
    lists. The lists hold each key in float16 (not its residual to the centroid), 256 bytes a key
    instead of 512: artifacts carry float16 keys, so this is exact and scores equal IVF-Flat's. Ids
    are faiss labels that are never reused; a hash table from label to list makes a remove
    O(list length) instead of a scan of every list."""

    def __init__(
        self,
        dim: int,
        edit_ids: list[str],
        keys: np.ndarray,
        nprobe: int = DEFAULT_NPROBE,
        centroids: np.ndarray | None = None,
        trained_on: int | None = None,
    ) -> None:
        """`centroids` (with the count `trained_on` they were trained on): the lists of an index trained
        before (a snapshot's), used as they are instead of training on `keys`."""
        import faiss

        super().__init__(dim)
        self._faiss = faiss
        n = len(edit_ids)
        self.nlist = max(1, min(int(math.sqrt(n)), n // 39)) if centroids is None else len(centroids)
        self._quantizer = faiss.IndexFlatIP(dim)  # owned here: the IVF index only points to it
        self._index = faiss.IndexIVFScalarQuantizer(
            self._quantizer, dim, self.nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        self._index.by_residual = False  # the key itself in float16: exact for float16 keys
        self._index.cp.max_points_per_centroid = 64
        keys = np.ascontiguousarray(keys, dtype=np.float32).reshape(n, dim)
        if centroids is None:
            self._index.train(keys)
        else:  # float16 storage learns nothing beyond the lists, so the index is trained once they are in
            self._quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32).reshape(self.nlist, dim))
            self._index.is_trained = True
        self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.set_nprobe(nprobe)
        self.trained_on = n if trained_on is None else trained_on
        self._labels: dict[int, str] = {}
        self._next = 0
        self._add(edit_ids, keys)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists scanned per query: `nprobe`, or every list where there are fewer."""
        self.nprobe = min(nprobe, self.nlist)
        self._index.nprobe = self.nprobe

    def _add(self, edit_ids: list[str], keys: np.ndarray) -> None:
        """Add under fresh labels; the tables in chunks (a bulk dict update holds the interpreter lock
        throughout: ~50 ms per 400k keys, which a build on another thread must not take from the apply
        loop in one piece)."""
        labels = np.arange(self._next, self._next + len(edit_ids), dtype=np.int64)
        self._index.add_with_ids(keys, labels)
        for start in range(0, len(edit_ids), _CHUNK):
            numbers, ids = labels[start : start + _CHUNK].tolist(), edit_ids[start : start + _CHUNK]
            self._labels.update(zip(numbers, ids, strict=True))
            self._by_edit.update(zip(ids, numbers, strict=True))
        self._next += len(edit_ids)

    def add(self, edit_id: str, key: torch.Tensor) -> None:
        if edit_id in self._by_edit:
            return
        self._add([edit_id], key.detach().float().cpu().numpy().reshape(1, self.dim))

    def remove(self, edit_id: str) -> None:
        label = self._by_edit.pop(edit_id, None)
        if label is None:
            return
        del self._labels[label]
        self._index.remove_ids(np.array([label], dtype=np.int64))

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Best score and edit_id per query row among the probed lists; (-inf, None) where none holds a key."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy().reshape(-1, self.dim))
        if not self._by_edit:
            return torch.full((len(q),), float("-inf")), [None] * len(q)
        scores, labels = self._index.search(q, 1)
        found = [self._labels.get(int(label)) for label in labels[:, 0]]
        best = torch.from_numpy(scores[:, 0].copy())
        best[torch.tensor([f is None for f in found])] = float("-inf")
        return best, found

    def training(self) -> dict[str, torch.Tensor]:
        """The lists' centroids and the count they were trained on."""
        centroids = self._quantizer.reconstruct_n(0, self.nlist)
        return {"ivf_centroids": torch.from_numpy(centroids), "ivf_trained_on": torch.tensor([self.trained_on])}

    def frozen_keys(self) -> Callable[[], tuple[list[str], np.ndarray]]:
        """`live_keys` as of now, read later: the call copies each list's labels and float16 codes (a
        removed key has left its list, so the lists hold exactly the live keys) and the label table;
        the callable it returns maps and widens them (on another thread, while this index changes)."""
        invlists, faiss = self._index.invlists, self._faiss
        labels, codes = [], []
        for lst in range(self.nlist):
            size = invlists.list_size(lst)
            if size:
                labels.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
                codes.append(faiss.rev_swig_ptr(invlists.get_codes(lst), size * self._index.code_size).copy())
        table = dict(self._labels)

        def read() -> tuple[list[str], np.ndarray]:
            if not labels:
                return [], np.zeros((0, self.dim), dtype=np.float32)
            keys = np.concatenate(codes).view(np.float16).reshape(-1, self.dim).astype(np.float32)
            numbers = np.concatenate(labels)
            ids = [
                table[n] for start in range(0, len(numbers), _CHUNK) for n in numbers[start : start + _CHUNK].tolist()
            ]
            return ids, keys

        return read

    def add_many(self, edit_ids: list[str], keys: torch.Tensor) -> None:
        """The keys not held yet, in one faiss call (the last row of a repeated id)."""
        fresh = {e: r for r, e in enumerate(edit_ids) if e not in self._by_edit}
        if fresh:
            rows = keys.detach().float().cpu().numpy().reshape(len(edit_ids), self.dim)[list(fresh.values())]
            self._add(list(fresh), np.ascontiguousarray(rows))


@contextmanager
def _every_core() -> Iterator[None]:
    """faiss on every core this process may use, for a bulk build or training in the caller's thread
    (a snapshot's lists, a training without `background`: new queries wait for it anyway)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


Change = tuple[str, "np.ndarray | None"]  # (edit id, its key; None: removed)


def _replay(index: IvfKeyIndex, changes: list[Change]) -> None:
    """Make `changes` to `index` in order: each id's last change counts, the adds in one faiss call."""
    last = dict(changes)
    for edit_id in last:
        index.remove(edit_id)
    added = {e: k for e, k in last.items() if k is not None}
    if added:
        index.add_many(list(added), torch.from_numpy(np.stack(list(added.values()))))


def _discard(index: _EditSlots) -> None:
    """Free a replaced index on a thread, its tables a chunk at a time (dropping a table of a million
    entries in one piece holds the interpreter lock for tens of ms)."""

    def drop() -> None:
        for table in (getattr(index, "_labels", {}), index._by_edit):
            while table:
                for _ in range(min(_CHUNK, len(table))):
                    table.popitem()

    threading.Thread(target=drop, name="index-discard", daemon=True).start()


class _Build:
    """An IVF index being trained and filled on a thread of its own (one OpenMP thread: the replica's
    apply loop and queries keep the other core), over a copy of the keys taken when it started; it
    then replays the `changes` made to the serving index meanwhile (a list the caller appends to),
    until only a few are left for the caller to replay when it takes the new index up."""

    LEFT = 256  # changes the thread leaves to the caller

    def __init__(
        self, dim: int, keys: Callable[[], tuple[list[str], np.ndarray]], count: int, nprobe: int, changes: list[Change]
    ) -> None:
        """`keys`: an index's `frozen_keys()` (read on the thread), `count` of them."""
        self.result: IvfKeyIndex | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.count = count
        self.changes, self.replayed = changes, 0  # the changes, and how many of them are in `result`
        self._thread = threading.Thread(target=self._run, args=(dim, keys, nprobe), name="ivf-build", daemon=True)
        self._thread.start()

    def _run(self, dim: int, keys: Callable[[], tuple[list[str], np.ndarray]], nprobe: int) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        try:
            fresh = IvfKeyIndex(dim, *keys(), nprobe)
            while len(self.changes) - self.replayed > self.LEFT:
                upto = len(self.changes)  # appends go on meanwhile; those below `upto` are settled
                _replay(fresh, self.changes[self.replayed : upto])
                self.replayed = upto
            self.result = fresh
        except BaseException as exc:  # a thread's top level: reported where the build is taken up
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


class ScalingKeyIndex:
    """Exact flat search up to `threshold` keys, IVF from there on (trained on the keys held then, and
    trained again whenever the count has grown `regrow`-fold since).

    With `background` (the default), training never stalls the caller (a replica's apply loop): the
    new IVF index is trained and filled on a thread over a copy of the live keys, while the current
    index keeps serving and taking adds and removes; those are logged and replayed onto the new index
    (most by the build's thread, the last few when it is taken up at the first call after it is done),
    so it holds exactly the same edits. Without, training runs in the call that crosses the count (a
    few seconds at a million keys). `bench/index_stall.py` measures the slowest add either way."""

    def __init__(
        self, dim: int, threshold: int, nprobe: int = DEFAULT_NPROBE, regrow: float = 4.0, background: bool = True
    ) -> None:
        if threshold < 1:
            raise ValueError(f"ann threshold {threshold}: must be at least 1")
        self.dim, self.threshold, self.nprobe, self.regrow = dim, threshold, nprobe, regrow
        self.background = background
        self.inner: KeyIndex | IvfKeyIndex = KeyIndex(dim)
        self._seeded: tuple[np.ndarray, int] | None = None  # centroids and their count, for the next bulk add
        self._build: _Build | None = None
        self._since: list[Change] = []  # the changes made since the running build began
        self._retry_at = 0  # after a failed build: no other before this count

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self.inner

    def add(self, edit_id: str, key: torch.Tensor) -> None:
        self._take_up()
        if self._build is not None and edit_id not in self.inner:
            self._since.append((edit_id, key.detach().float().cpu().numpy().reshape(self.dim)))
        self.inner.add(edit_id, key)
        self._train_if_grown()

    def add_many(self, edit_ids: list[str], keys: torch.Tensor) -> None:
        self._take_up()
        seeded, self._seeded = self._seeded, None
        last = {e: r for r, e in enumerate(edit_ids)} if seeded and not len(self.inner) else {}  # last row counts
        if len(last) >= self.threshold:
            self._train(list(last), keys[list(last.values())].detach().float().cpu().numpy(), seeded)
        else:
            if self._build is not None:  # the last row of a repeated id, as the index takes it
                rows = keys.detach().float().cpu().numpy().reshape(len(edit_ids), self.dim)
                last_rows = {e: r for r, e in enumerate(edit_ids) if e not in self.inner}
                self._since.extend((e, rows[r]) for e, r in last_rows.items())
            self.inner.add_many(edit_ids, keys)
        self._train_if_grown()

    def training(self) -> dict[str, torch.Tensor]:
        """The IVF lists' centroids and the count they were trained on; none while flat."""
        return self.inner.training()

    def seed(self, training: dict[str, torch.Tensor]) -> None:
        """Build the IVF index of the next bulk add (into an empty index, of at least `threshold` keys)
        on `training` (an index's `training()`) instead of adding flat and training again; ignored
        (with a warning) if it does not fit."""
        centroids, trained_on = training.get("ivf_centroids"), training.get("ivf_trained_on")
        if centroids is None or trained_on is None:
            return
        if centroids.ndim != 2 or centroids.shape[1] != self.dim or not len(centroids) or trained_on.numel() != 1:
            log.warning(
                "key index: seeded centroids of shape %s do not fit %d-dim keys; training anew",
                tuple(centroids.shape),
                self.dim,
            )
            return
        if len(self.inner):
            return
        self.wait()
        self.inner = KeyIndex(self.dim)
        self._seeded = (centroids.float().numpy(), int(trained_on.item()))

    def _due(self) -> bool:
        """Has the count crossed the next training point (the threshold, then `regrow` x the last training)?"""
        n = len(self.inner)
        if n < self._retry_at:
            return False
        if isinstance(self.inner, KeyIndex):
            return n >= self.threshold
        return n >= self.regrow * self.inner.trained_on

    def _train_if_grown(self) -> None:
        if self._build is None and self._due():
            if self.background:
                self._start_build()
            else:
                self._train()

    def _start_build(self) -> None:
        """Train and fill the next IVF index on a thread, over a copy of the live keys taken now."""
        self._since = []
        self._build = _Build(self.dim, self.inner.frozen_keys(), len(self.inner), self.nprobe, self._since)
        log.info("key index: training IVF over %d keys in the background", len(self.inner))

    def _take_up(self) -> None:
        """Swap in a finished background build, replaying the adds and removes made since it began."""
        build = self._build
        if build is None or not build.done():
            return
        self._build, since = None, self._since
        self._since = []
        fresh = build.result
        if fresh is not None:
            _replay(fresh, since[build.replayed :])
        if fresh is None or len(fresh) != len(self.inner):
            log.error(
                "key index: the background IVF build over %d keys failed (%s); the current index serves on, "
                "the next try after another %gx growth",
                build.count,
                repr(build.error) if fresh is None else f"{len(fresh)} keys, not {len(self.inner)}",
                self.regrow,
            )
            self._retry_at = int(build.count * self.regrow)
            return
        fresh.set_nprobe(self.nprobe)
        _discard(self.inner)
        self.inner = fresh
        log.info(
            "key index: IVF over %d keys (%d lists, %d probed) trained in the background in %.1f s; "
            "%d changes made meanwhile replayed",
            build.count,
            fresh.nlist,
            fresh.nprobe,
            time.perf_counter() - build.started,
            len(since),
        )
        self._train_if_grown()

    def wait(self) -> None:
        """Finish a background build now (if one is running) and take it up."""
        if self._build is not None:
            self._build.join()
            self._take_up()

    def _train(
        self, edit_ids: list[str] | None = None, keys: np.ndarray | None = None, seeded: tuple | None = None
    ) -> None:
        """The IVF index over `keys` of `edit_ids` (default: the live keys held now), trained on them,
        or on the `seeded` (centroids, trained-on count) as given: no flat stage, no k-means."""
        started = time.perf_counter()
        if edit_ids is None:
            edit_ids, keys = self.inner.live_keys()
        with _every_core():
            self.inner = IvfKeyIndex(self.dim, edit_ids, keys, self.nprobe, *(seeded or ()))
        log.info(
            "key index: IVF over %d keys (%d lists%s, %d probed) in %.1f s",
            len(edit_ids),
            self.inner.nlist,
            " as given" if seeded else "",
            self.inner.nprobe,
            time.perf_counter() - started,
        )

    def remove(self, edit_id: str) -> None:
        self._take_up()
        if self._build is not None and edit_id in self.inner:
            self._since.append((edit_id, None))
        self.inner.remove(edit_id)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        self._take_up()
        return self.inner.search(queries)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists scanned per query from now on (and after retraining); at most the lists there are."""
        if nprobe < 1:
            raise ValueError(f"nprobe {nprobe}: must be at least 1")
        self.nprobe = nprobe
        if isinstance(self.inner, IvfKeyIndex):
            self.inner.set_nprobe(nprobe)


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


def make_index(
    dim: int, device: torch.device | str = "cpu", ann_threshold: int = 0
) -> KeyIndex | ScalingKeyIndex | TensorKeyIndex:
    """The tensor index on a CUDA device (keys beside the model); on the CPU faiss, flat, or flat
    until `ann_threshold` keys and IVF beyond (0: always flat)."""
    if torch.device(device).type == "cuda":
        return TensorKeyIndex(dim, device)
    return ScalingKeyIndex(dim, ann_threshold) if ann_threshold else KeyIndex(dim)
