"""Evaluator: keeps probing replicas for retention of old edits and locality, into Arrow logs.

Each round samples earlier edits (their prompts: reliability; their paraphrases: generality) and
unrelated prompts (locality), asks one replica for greedy answers and scores them as a user reads
them (WILD: the answer cut at the first ".", newline or end; reliability and generality 1 when it
starts with the target's words, locality 1 when it equals the unedited model's cut answer, cached
once), and appends the records. Every `general_every` rounds, when the replica has
caught up with the journal, it also measures the replica's perplexity on fixed accurate passages
(`hallucination/wiki_accurate.json` when the data directory is there): kind `perplexity`, the
general-ability probe that shows a collapsing model. It spends at most `budget` of wall time
probing (e.g. 0.1 = 10%), sleeping the rest, so evaluation never starves serving; and it probes a
replica only while that replica has applied the whole journal and no fact arrived for `quiet_ms`,
dropping a round as soon as new entries arrive, so applying an edit queues behind at most one call
(a cost: during a long unbroken stream there is no evaluation until it pauses).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import ray

from editstream import wild
from editstream.arrowlog import EVAL_SCHEMA, ArrowLog
from editstream.data import DEFAULT_DATA_DIR, read_records
from editstream.probes import LOCALITY_POOL
from services.transport.store import RedisStore, connect
from services.wiring.clients import ReplicaClient
from services.workers.prometheus import Metrics

log = logging.getLogger(__name__)


class _Yield(Exception):
    """A probe round gives way to journal entries that arrived while it ran."""


class Evaluator:
    """Plain class behind the evaluator actor; `replicas` are Ray actor handles of ReplicaService."""

    def __init__(
        self,
        redis_url: str,
        run_dir: str,
        replicas: list,
        method: str,
        namespace: str = "editstream",
        probes_per_round: int = 8,
        call_size: int = 4,
        budget: float = 0.1,
        seed: int = 0,
        name: str = "evaluator-0",
        general_every: int = 3,
        general_texts: int = 16,
        wild_tokens: int = 24,
        ask_size: int = 2,
        quiet_ms: float = 1000.0,
    ) -> None:
        self.store = RedisStore(connect(redis_url), namespace)
        self.replicas = list(replicas)
        self.method, self.name = method, name
        self.log = ArrowLog(Path(run_dir), "eval", EVAL_SCHEMA)
        self.probes_per_round, self.budget, self.call_size = probes_per_round, budget, call_size
        self.rng = random.Random(seed)
        self._locality_base: dict[str, str] | None = None
        self.rounds = 0
        self.version = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.metrics = Metrics(name)
        self.general_every = general_every
        # Each call holds the replica while it decodes; short calls keep journal entries from
        # waiting behind a probe. Answer-first needs only the answer's start, so 24 tokens judge as 50.
        self.wild_tokens, self.ask_size = wild_tokens, ask_size
        # A probe call holds the replica for its whole generation (up to a second on 2 CPU cores), so
        # probes wait for a pause of `quiet_ms` in the stream: during a burst, edits are not delayed.
        self.quiet_ms = quiet_ms
        self.general = general_passages(general_texts) if general_every else []

    def set_replicas(self, replicas: list) -> None:
        self.replicas = list(replicas)

    def _locality_reference(self, replica) -> dict[str, str]:
        """The unedited model's cut answers on the locality pool."""
        if self._locality_base is None:
            prompts = [p for p, _ in LOCALITY_POOL]
            res = self._ask(replica, prompts, edited=False)
            self._locality_base = {p: wild.cut(r["text"]) for p, r in zip(prompts, res, strict=True)}
        return self._locality_base

    def _sample_edits(self, version: int) -> list:
        if version < 1:
            return []
        seqs = sorted({self.rng.randint(1, version) for _ in range(self.probes_per_round)})
        return [e for e in self.store.journal_get(seqs) if e.payload["op"] == "edit"]

    def step(self) -> int:
        if not self.replicas:
            time.sleep(0.5)
            return 0
        started = time.time()
        idx = self.rounds % len(self.replicas)
        replica = self.replicas[idx]
        state = ray.get(ReplicaClient(replica).state())
        newest = self.store.last_entry_ms()  # None: nothing edited yet, nothing to evaluate
        streaming = newest is None or time.time() * 1000 - newest < self.quiet_ms
        if state["version"] < self.store.last_seq() or streaming:  # applying edits goes first
            self._closed.wait(0.2)
            return 0
        try:
            base = self._locality_reference(replica)
        except _Yield:
            return 0
        entries = self._sample_edits(state["version"])
        if entries:  # retracted and superseded edits are meant to be gone: probing them would cry forgetting
            live = ray.get(ReplicaClient(replica).active([e.payload["edit_id"] for e in entries]))
            entries = [e for e, keep in zip(entries, live, strict=True) if keep]
        contexts, answers, meta = [], [], []
        for e in entries:
            p = e.payload
            contexts.append(p["prompt"])
            answers.append(p["target"])
            meta.append(("reliability", e))
            if p.get("paraphrases"):
                contexts.append(self.rng.choice(p["paraphrases"]))
                answers.append(p["target"])
                meta.append(("generality", e))
        loc = self.rng.sample(LOCALITY_POOL, k=min(4, len(LOCALITY_POOL)))
        for prompt, answer in loc:
            contexts.append(prompt)
            answers.append(answer)
            meta.append(("locality", None))
        try:
            res = self._ask(replica, contexts)
        except _Yield:
            return 0
        now = time.time()
        rows: list[dict[str, Any]] = []
        # the perplexity probe holds the replica for a while: only when it has nothing to apply
        if self.general and self.rounds % self.general_every == 0 and state["version"] >= self.store.last_seq():
            version, ppl = self._perplexity(replica)
            rows.append(self._row(now, state["name"], version, "perplexity", None, ppl, False))
        for (kind, entry), ctx, target, r in zip(meta, contexts, answers, res, strict=True):
            if kind == "locality":
                score = float(wild.same_answer(r["text"], base[ctx]))
            else:
                score = float(wild.answer_first(wild.cut(r["text"], target), target))
            rows.append(self._row(now, state["name"], r["version"], kind, entry, score, r["fired"] is not None))
        with self._lock:
            if self._closed.is_set():
                return 0
            self.log.append(rows)
            self.rounds += 1
            self.version = max([self.version] + [r["version"] for r in rows])
        for kind, gauge in (("reliability", self.metrics.retention), ("locality", self.metrics.locality)):
            scores = [r["score"] for r in rows if r["kind"] == kind]
            if scores:
                gauge.set(sum(scores) / len(scores))
        spent = time.time() - started
        self._closed.wait(spent * (1 / self.budget - 1) if self.budget < 1 else 0)  # stay within the budget
        return len(rows)

    def _row(self, now: float, replica: str, version: int, kind: str, entry, score: float, fired: bool) -> dict:
        return {
            "time": int(now * 1000),
            "replica": replica,
            "version": version,
            "kind": kind,
            "edit_id": entry.payload["edit_id"] if entry else "",
            "edit_seq": entry.seq if entry else 0,
            "age_edits": version - entry.seq if entry else 0,
            "age_s": now - entry.at_ms / 1000 if entry else 0.0,
            "score": score,
            "fired": fired,
            "method": self.method,
        }

    def _perplexity(self, replica) -> tuple[int, float]:
        """Perplexity on the general passages, in calls of `call_size` passages (short lock holds)."""
        total, count, version = 0.0, 0, 0
        for i in range(0, len(self.general), self.call_size):
            res = ray.get(ReplicaClient(replica).nll(self.general[i : i + self.call_size]))
            total, count, version = total + res["nll"], count + res["tokens"], res["version"]
        return version, math.exp(total / max(count, 1))

    def _ask(self, replica, prompts: list[str], edited: bool = True) -> list[dict]:
        """Greedy answers up to the WILD cut, in calls of `ask_size` prompts, so that a query or a
        journal entry never waits behind more than a few probes."""
        out: list[dict] = []
        for i in range(0, len(prompts), self.ask_size):
            if out and out[-1]["version"] < self.store.last_seq():
                raise _Yield  # new journal entries arrived: applying them must not wait behind probes
            chunk = prompts[i : i + self.ask_size]
            out += ray.get(ReplicaClient(replica).ask(chunk, self.wild_tokens, until_cut=True, edited=edited))
        return out

    def flush(self) -> None:
        """Close the log (the loop stops writing)."""
        with self._lock:
            self._closed.set()
            self.log.close()

    def stats(self) -> dict:
        """Rounds done, and the highest replica version a round has probed at."""
        return {"rounds": self.rounds, "name": self.name, "version": self.version}


def general_passages(n: int) -> list[str]:
    """The first `n` accurate Wikipedia passages of the benchmark data, or none if it is absent."""
    path = DEFAULT_DATA_DIR / "hallucination" / "wiki_accurate.json"
    if not path.is_file():
        log.info("no %s: evaluators skip the perplexity probe", path)
        return []
    return [r["text"] for r in read_records(path)[:n]]
