"""Editor: computes artifacts for journaled edits, stores them, then announces them.

Editors share the journal through a consumer group, so several can work in parallel; computing
never touches a replica. An artifact is stored before the journal entry is acked, under the entry's
seq and write-once: if an entry is computed twice (a crash, or an entry claimed from an editor that
was slow), the first stored artifact is the one every replica applies, even where compute depends
on the editor's own history (SCEN's negatives, a sequential method's model copy).
"""

from __future__ import annotations

import logging
import time

import torch

from editstream.artifacts import Artifact
from editstream.edits import EditRequest
from editstream.errors import OrderError
from editstream.events import edit_from_payload
from editstream.methods import create_method
from editstream.models import load_causal_lm
from services.transport.store import GroupReader, RedisStore, connect

log = logging.getLogger(__name__)


def warm_up_edits(n: int) -> list[EditRequest]:
    """`n` throwaway edits of prompts from 3 to 24 words: an encoder's first passes at a batch shape
    (buffers, kernels, an int8 encoder's arena) cost several times a warm pass; measured in a soak at
    200 facts/s, a cold editor built a backlog of ~900 facts over its first 5 s, up to 1.3 s behind."""
    return [
        EditRequest(" ".join(["warm-up prompt about a subject"] * (1 + i % 5)), "warm-up", edit_id=f"warm-up-{i}")
        for i in range(n)
    ]


class Editor:
    """The compute loop as a plain class; one model copy for compute only."""

    def __init__(
        self,
        redis_url: str,
        method: str,
        model: str,
        namespace: str = "editstream",
        consumer: str = "editor-0",
        batch: int = 128,
        block_ms: int = 100,
        threads: int = 2,
        claim_idle_ms: int = 10000,
        method_options: dict | None = None,
        max_tries: int = 3,
    ) -> None:
        torch.set_num_threads(threads)
        self.max_tries = max_tries  # compute attempts per entry before it is dead-lettered
        self.store = RedisStore(connect(redis_url), namespace)
        self.method = create_method(method, load_causal_lm(model), **(method_options or {}))
        self.consumer = consumer
        self.computed = 0
        self.compute_s = 0.0  # seconds inside method.compute (the rest is Redis and bookkeeping)
        self.version = 0  # sequential methods: last journal seq reflected in this editor's own copy
        self._rebuilt = not self.method.sequential  # sequential: rebuild on the first step (needs Redis)
        if not self.method.sequential:  # the first calls are slow: one and a full batch, before traffic comes
            for n in sorted({1, min(batch, self.method.editor_batch)}):
                self.method.compute(warm_up_edits(n))
        self.reader = GroupReader(
            self.store.r,
            self.store.keys.journal,
            f"editors-{method}",
            consumer,
            min(batch, self.method.editor_batch),
            block_ms,
            claim_idle_ms,
        )

    def step(self) -> int:
        if not self._rebuilt:
            self._rebuild()
            self._rebuilt = True
        entries = [self.store._entry(i, f) for i, f in self.reader.read()]
        if self.method.sequential:
            self._compute_in_order(entries)
        else:
            edits = [(e.seq, edit_from_payload(e.payload)) for e in entries if e.payload["op"] == "edit"]
            if edits:
                started = time.perf_counter()
                try:
                    done = list(zip([s for s, _ in edits], self.method.compute([e for _, e in edits]), strict=True))
                except Exception:  # one bad entry must not sink its batch: compute each alone
                    log.exception(
                        "%s: computing %d entries failed; computing them one by one", self.consumer, len(edits)
                    )
                    done = [(s, a) for s, e in edits if (a := self._compute_alone(s, e)) is not None]
                self.compute_s += time.perf_counter() - started
                if done:
                    self._store([a for _, a in done], [s for s, _ in done])
        if entries:
            self.reader.ack([f"{e.seq}-1" for e in entries])
        return len(entries)

    def _compute_alone(self, seq: int, edit: EditRequest) -> Artifact | None:
        """One entry's artifact, tried `max_tries` times; after that it is dead-lettered (None)."""
        for attempt in range(1, self.max_tries + 1):
            try:
                return self.method.compute([edit])[0]
            except Exception as exc:  # noqa: PERF203 - each attempt is a whole compute
                if attempt == self.max_tries:
                    log.error(
                        "%s: seq %d (%s) failed %d times; dead-lettered: %r",
                        self.consumer,
                        seq,
                        edit.edit_id,
                        attempt,
                        exc,
                    )
                    self.store.mark_dead(seq, edit.edit_id, "compute", repr(exc), attempt)
        return None

    def _store(self, artifacts: list[Artifact], seqs: list[int]) -> list[Artifact]:
        """Store the artifacts; returns what is stored for each seq (an earlier writer's, where one was)."""
        taken = self.store.put_artifacts(
            self.method.name, {s: a.to_bytes() for s, a in zip(seqs, artifacts, strict=True)}
        )
        self.computed += len(artifacts)
        if not taken:
            return artifacts
        stored = self.store.get_artifacts(self.method.name, taken)
        log.info("%s: seqs %s were already stored by another editor; using those", self.consumer, taken)
        return [Artifact.from_bytes(stored[s]) if s in stored else a for s, a in zip(seqs, artifacts, strict=True)]

    def _compute_in_order(self, entries: list) -> None:
        """Sequential methods: compute each edit on top of this editor's own edited copy, then apply it.
        Methods that solve several edits jointly (`batch_edits`, e.g. MEMIT) get each run of
        consecutive edits at once."""
        pending = [e for e in entries if e.seq > self.version]  # the rest were replayed after a restart
        i = 0
        while i < len(pending):
            entry = pending[i]
            if entry.payload["op"] == "retract":
                self.method.remove(entry.payload["retracts"])
                self.version, i = entry.seq, i + 1
                continue
            j = i + 1
            while self.method.batch_edits and j < len(pending) and pending[j].payload["op"] == "edit":
                j += 1
            group = pending[i:j]
            try:
                artifacts = self.method.compute([edit_from_payload(e.payload) for e in group])
                seqs = [e.seq for e in group]
            except Exception:  # a bad entry in a joint solve: solve each alone, dead-letter what keeps failing
                log.exception("%s: computing seqs %d-%d failed; one by one", self.consumer, group[0].seq, group[-1].seq)
                alone = [(e.seq, self._compute_alone(e.seq, edit_from_payload(e.payload))) for e in group]
                artifacts, seqs = [a for _, a in alone if a is not None], [s for s, a in alone if a is not None]
            for artifact in self._store(artifacts, seqs) if artifacts else []:
                self.method.apply(artifact)
            self.version, i = group[-1].seq, j

    def _rebuild(self) -> None:
        """After a restart, re-apply the stored artifacts of the journal prefix this editor finished."""
        compacted = self.store.compacted()
        if compacted:  # `serve --compact` refuses sequential methods; a namespace compacted by hand lands here
            raise OrderError(
                f"{self.consumer}: the journal is compacted below seq {compacted}; a {self.method.name} editor "
                "rebuilds its model from the whole journal and cannot start"
            )
        after = 0
        while True:
            entries = self.store.journal_after(after, count=512)
            if not entries:
                return
            blobs = self.store.get_artifacts(self.method.name, [e.seq for e in entries if e.payload["op"] == "edit"])
            for e in entries:
                if e.payload["op"] == "retract":
                    self.method.remove(e.payload["retracts"])
                elif blobs.get(e.seq) is None:
                    if self.store.dead([e.seq])[e.seq] is None:
                        return
                    # a dead-lettered entry: nothing to apply
                else:
                    self.method.apply(Artifact.from_bytes(blobs[e.seq]))
                self.version = after = e.seq

    def stats(self) -> dict:
        return {"computed": self.computed, "compute_s": round(self.compute_s, 3), "consumer": self.consumer}
