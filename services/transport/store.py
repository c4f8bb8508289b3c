"""Redis transport: the facts stream, dead-letter stream, journal, artifact store and announcements.

Keys (namespace `editstream` by default):
  <ns>:facts          fact events from producers (stream; consumer group `ingest`)
  <ns>:facts:dlq      rejected events with their reason (stream, the newest ~DLQ_KEPT kept)
  <ns>:journal        accepted operations, entry id `<seq>-1`, field `payload` (JSON) (stream)
  <ns>:ids            edit_id -> "<seq>:<content hash>:<op>", or "<seq>:<hash>:retracted:<retract id>"
                      for an edit a retract removed (hash; dedup and retract lookup)
  <ns>:seq            last assigned seq (counter)
  <ns>:artifacts      "<method>:<seq>" -> artifact bytes (safetensors), written once: the first
                      editor to store a journal entry's artifact wins (hash)
  <ns>:dead           seq -> JSON {stage, edit_id, error, tries}: a journal entry whose compute or
                      apply kept failing; every replica skips it (hash, written once)
  <ns>:journal:dlq    the same records as a stream, for operators (capped)
  <ns>:announce       "an artifact is stored" notifications (stream)
  <ns>:replicas       replica name -> JSON heartbeat {version, digest, ready, time} (hash)
  <ns>:desired        kind (replica, editor, evaluator) -> wanted count, set by `editstream scale` (hash)
  <ns>:serving        a running `editstream serve` loop's heartbeat (string with a TTL)
  <ns>:compacted      the seq below which the journal, its artifacts and dead-letter records were
                      removed (`compact`); a replica behind it must start from a snapshot (string)
Dedup, seq assignment and journal append happen in one Lua script, so they are atomic.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

DLQ_KEPT = 100_000  # dead-lettered events kept for inspection (approximately; the oldest go first)

_APPEND = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
local returning = nil
if existing then
  local seq, hash, op = string.match(existing, '^(%d+):([^:]*):(%a+)')
  if op ~= 'retracted' then
    if hash == ARGV[2] then return {'dup', seq} end
    return {'conflict', seq}
  end
  returning = string.match(existing, ':retracted:(.*)$')
end
if ARGV[4] ~= '' then
  local target = redis.call('HGET', KEYS[1], ARGV[4])
  if not target then return {'unknown', '0'} end
  if string.find(target, ':retracted:') then return {'retracted', '0'} end
  if not string.find(target, ':edit$') then return {'unknown', '0'} end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], seq .. ':' .. ARGV[2] .. ':' .. ARGV[5])
if ARGV[4] ~= '' then
  local target = redis.call('HGET', KEYS[1], ARGV[4])
  redis.call('HSET', KEYS[1], ARGV[4], (string.gsub(target, ':edit$', ':retracted:' .. ARGV[1])))
end
if returning then
  -- a retracted edit comes back: forget the retract that removed it, so the same retract can run again
  redis.call('HDEL', KEYS[1], returning)
end
redis.call('XADD', KEYS[3], seq .. '-1', 'payload', ARGV[3], 'at', ARGV[6])
return {'new', tostring(seq)}
"""


@dataclass(frozen=True)
class Keys:
    facts: str
    dlq: str
    journal: str
    ids: str
    seq: str
    artifacts: str
    dead: str
    journal_dlq: str
    announce: str
    replicas: str
    desired: str
    serving: str
    compacted: str

    @classmethod
    def for_namespace(cls, ns: str = "editstream") -> Keys:
        return cls(
            f"{ns}:facts",
            f"{ns}:facts:dlq",
            f"{ns}:journal",
            f"{ns}:ids",
            f"{ns}:seq",
            f"{ns}:artifacts",
            f"{ns}:dead",
            f"{ns}:journal:dlq",
            f"{ns}:announce",
            f"{ns}:replicas",
            f"{ns}:desired",
            f"{ns}:serving",
            f"{ns}:compacted",
        )


@dataclass
class JournalEntry:
    seq: int
    payload: dict[str, Any]
    at_ms: float  # when the fact entered the facts stream (ms since epoch)


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis:// or rediss:// for TLS; a password in the URL is used)."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=15)


class RedisStore:
    """Every Redis call the pipeline makes, in one place."""

    def __init__(self, client: redis.Redis, namespace: str = "editstream") -> None:
        self.r = client
        self.namespace = namespace
        self.keys = Keys.for_namespace(namespace)
        self._append = client.register_script(_APPEND)

    def memory_by_key(self) -> dict[str, int]:
        """Redis memory of each of the namespace's keys (`MEMORY USAGE`, every element counted),
        by key without the namespace prefix."""
        prefix = f"{self.namespace}:"
        keys = sorted(k.decode() for k in self.r.scan_iter(f"{prefix}*"))
        return {k.removeprefix(prefix): int(self.r.memory_usage(k, samples=0) or 0) for k in keys}

    # --- journal ---------------------------------------------------------------------------------
    def journal_append(
        self, edit_id: str, content_hash: str, payload: dict[str, Any], at_ms: float, retracts: str = ""
    ) -> tuple[str, int]:
        """('new'|'dup'|'conflict'|'unknown'|'retracted', seq): dedup by edit_id, then the next seq,
        atomically. An edit_id whose edit was retracted may come back (a new seq); retracting an edit
        that is already retracted is 'retracted'."""
        k = self.keys
        status, seq = self._append(
            keys=[k.ids, k.seq, k.journal],
            args=[edit_id, content_hash, json.dumps(payload), retracts, payload["op"], f"{at_ms:.3f}"],
        )
        return status.decode(), int(seq)

    def journal_after(self, seq: int, count: int = 256) -> list[JournalEntry]:
        """Journal entries with seq > `seq`, in order."""
        rows = self.r.xrange(self.keys.journal, min=f"({seq}-1", max="+", count=count)
        return [self._entry(entry_id, fields) for entry_id, fields in rows]

    def journal_get(self, seqs: list[int]) -> list[JournalEntry]:
        pipe = self.r.pipeline(transaction=False)
        for s in seqs:
            pipe.xrange(self.keys.journal, min=f"{s}-1", max=f"{s}-1")
        return [self._entry(*rows[0]) for rows in pipe.execute() if rows]

    @staticmethod
    def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> JournalEntry:
        return JournalEntry(int(entry_id.split(b"-")[0]), json.loads(fields[b"payload"]), float(fields[b"at"]))

    def last_seq(self) -> int:
        return int(self.r.get(self.keys.seq) or 0)

    def last_entry_ms(self) -> float | None:
        """When the newest journal entry's fact entered the facts stream (ms since epoch), or None."""
        rows = self.r.xrevrange(self.keys.journal, count=1)
        return float(rows[0][1][b"at"]) if rows else None

    # --- artifacts -------------------------------------------------------------------------------
    def put_artifacts(self, method: str, artifacts: dict[int, bytes]) -> list[int]:
        """Store journal entries' artifacts durably (write-once: an entry that already has one keeps
        it), then announce them (never the other way round). Returns the seqs that were already stored."""
        if not artifacts:
            return []
        pipe = self.r.pipeline(transaction=False)
        for seq, data in artifacts.items():
            pipe.hsetnx(self.keys.artifacts, f"{method}:{seq}", data)
        taken = [seq for seq, written in zip(artifacts, pipe.execute(), strict=True) if not written]
        self.r.xadd(
            self.keys.announce,
            {"method": method, "seqs": ",".join(map(str, artifacts))},
            maxlen=10000,
            approximate=True,
        )
        return taken

    def get_artifacts(self, method: str, seqs: list[int]) -> dict[int, bytes | None]:
        """The stored artifacts of journal entries `seqs` (None where none is stored yet)."""
        if not seqs:
            return {}
        values = self.r.hmget(self.keys.artifacts, [f"{method}:{s}" for s in seqs])
        return dict(zip(seqs, values, strict=True))

    def mark_dead(self, seq: int, edit_id: str, stage: str, error: str, tries: int) -> bool:
        """Dead-letter journal entry `seq` (its compute or apply failed `tries` times); announces it so
        replicas move on. False if it was dead-lettered before (the first record stays)."""
        record = {"stage": stage, "edit_id": edit_id, "error": error[:2000], "tries": tries}
        first = bool(self.r.hsetnx(self.keys.dead, str(seq), json.dumps(record)))
        if first:
            self.r.xadd(self.keys.journal_dlq, {"seq": seq, **record}, maxlen=100_000, approximate=True)
            self.r.xadd(self.keys.announce, {"dead": str(seq)}, maxlen=10000, approximate=True)
        return first

    def dead(self, seqs: list[int]) -> dict[int, dict[str, Any] | None]:
        """The dead-letter records of journal entries `seqs` (None for live ones)."""
        if not seqs:
            return {}
        values = self.r.hmget(self.keys.dead, [str(s) for s in seqs])
        return {s: json.loads(v) if v else None for s, v in zip(seqs, values, strict=True)}

    def wait_announce(self, last_id: str, block_ms: int) -> str:
        """Block until something is announced after `last_id` (or the timeout); the newest id seen."""
        rows = self.r.xread({self.keys.announce: last_id}, block=block_ms, count=100)
        if rows:
            return rows[0][1][-1][0].decode()
        return last_id

    # --- compaction ----------------------------------------------------------------------------
    def compacted(self) -> int:
        """The seq the journal was compacted to (entries before it are gone; 0: never compacted)."""
        return int(self.r.get(self.keys.compacted) or 0)

    def compact(self, method: str, below: int, chunk: int = 10_000) -> dict[str, int]:
        """Remove what a replica starting from a snapshot at seq >= `below` does not need: the journal
        entries before `below` (the entry at `below` stays: a snapshot is checked against it), and the
        artifacts and dead-letter records of every entry up to `below`. The mark is set first, so a
        reader never mistakes a compacted journal for a short one; it never moves back. Returns what
        was removed."""
        if below <= self.compacted():
            return {"journal": 0, "artifacts": 0, "dead": 0}
        self.r.set(self.keys.compacted, below)  # monotonic: only the one snapshot writer compacts
        removed = {"journal": 0, "artifacts": 0, "dead": 0}
        after = 0
        while after < below:
            rows = self.r.xrange(self.keys.journal, min=f"({after}-1", max=f"{below}-1", count=chunk)
            if not rows:
                break
            seqs = [int(entry_id.split(b"-")[0]) for entry_id, _ in rows]
            pipe = self.r.pipeline(transaction=False)
            pipe.hdel(self.keys.artifacts, *[f"{method}:{s}" for s in seqs])
            pipe.hdel(self.keys.dead, *[str(s) for s in seqs])
            gone_artifacts, gone_dead = pipe.execute()
            removed["artifacts"] += gone_artifacts
            removed["dead"] += gone_dead
            after = seqs[-1]
        removed["journal"] = int(self.r.xtrim(self.keys.journal, minid=f"{below}-0", approximate=False))
        log.info("compacted below seq %d: removed %s", below, removed)
        return removed

    # --- facts and dead letters ----------------------------------------------------------------
    def dead_letter(self, entry_id: str, fields: dict[bytes, bytes], reason: str) -> None:
        record = {b"reason": reason.encode(), b"source_id": entry_id.encode()}
        record.update({b"field:" + k: v for k, v in fields.items()})
        self.r.xadd(self.keys.dlq, record, maxlen=DLQ_KEPT, approximate=True)

    def dlq_size(self) -> int:
        return int(self.r.xlen(self.keys.dlq))

    def heartbeat(self, name: str, state: dict[str, Any]) -> None:
        self.r.hset(self.keys.replicas, name, json.dumps(state))

    def replica_heartbeats(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.keys.replicas).items()}

    def ready_replicas(self, stale_s: float = 10.0) -> list[str]:
        """Replicas that caught up with the journal and sent a heartbeat within `stale_s`."""
        now = time.time()
        beats = self.replica_heartbeats()
        return sorted(n for n, b in beats.items() if b.get("ready") and now - b.get("time", 0) <= stale_s)

    def forget_replica(self, name: str) -> None:
        self.r.hdel(self.keys.replicas, name)

    def desired(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.keys.desired).items()}

    def set_desired(self, counts: dict[str, int]) -> None:
        if counts:
            self.r.hset(self.keys.desired, mapping={k: int(v) for k, v in counts.items()})

    def mark_serving(self, info: dict[str, Any], ttl_s: int = 30) -> None:
        self.r.set(self.keys.serving, json.dumps(info), ex=ttl_s)

    def serving(self) -> dict[str, Any] | None:
        raw = self.r.get(self.keys.serving)
        return json.loads(raw) if raw else None

    def ingest_lag(self, group: str = "ingest") -> int | None:
        """Entries in the facts stream not yet delivered to the ingest group, plus those pending;
        None when unknown. Redis reports `lag` as nil after an AOF reload (entries-read is lost):
        then the entries after the group's last-delivered id are counted, never assumed zero."""
        try:
            groups = self.r.xinfo_groups(self.keys.facts)
        except redis.ResponseError:
            return None
        for g in groups:
            if g["name"].decode() != group:
                continue
            pending = int(g.get("pending") or 0)
            if g.get("lag") is not None:
                return int(g["lag"]) + pending
            last = g["last-delivered-id"].decode() if g.get("last-delivered-id") else "0-0"
            undelivered = self.r.xrange(self.keys.facts, min=f"({last}", max="+")
            return len(undelivered) + pending
        return None

    def facts_size(self) -> int:
        return int(self.r.xlen(self.keys.facts)) if self.r.exists(self.keys.facts) else 0


class GroupReader:
    """Consumer-group reads in the order a restart needs: this consumer's own pending entries
    first (id 0), then entries other consumers left idle (XAUTOCLAIM), then new ones (BLOCK)."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        batch: int = 128,
        block_ms: int = 100,
        claim_idle_ms: int = 10000,
    ) -> None:
        self.r, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.batch, self.block_ms, self.claim_idle_ms = batch, block_ms, claim_idle_ms
        self._pending_done = False
        self._group_ready = False  # created on the first read: constructing needs no Redis

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        if not self._group_ready:
            self._ensure_group()
        if not self._pending_done:
            rows = self.r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.batch)
            if rows and rows[0][1]:  # entries trimmed away since (a compacted journal) come back empty
                kept = [e for e in rows[0][1] if e[1]]
                if len(kept) < len(rows[0][1]):
                    self.ack([e[0] for e in rows[0][1] if not e[1]])
                if kept:
                    return kept
                return self.read()
            self._pending_done = True
        claimed = self.r.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=self.batch)
        if claimed[1]:
            return [e for e in claimed[1] if e[1] is not None]
        rows = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=self.block_ms)
        return rows[0][1] if rows else []

    def ack(self, entry_ids: list) -> None:
        if entry_ids:
            self.r.xack(self.stream, self.group, *entry_ids)

    def trim_consumed(self) -> None:
        """Delete the entries every consumer of the group has read and acked: those before the oldest
        pending entry, or before the last delivered one when nothing is pending."""
        summary = self.r.xpending(self.stream, self.group)
        if summary["pending"]:
            oldest = summary["min"]
        else:
            info = {g["name"].decode(): g for g in self.r.xinfo_groups(self.stream)}
            last = info[self.group]["last-delivered-id"]
            major, minor = (int(x) for x in last.decode().split("-"))
            oldest = f"{major}-{minor + 1}"  # the last delivered entry is acked too: it can go
        self.r.xtrim(self.stream, minid=oldest, approximate=False)


def status(store: RedisStore) -> dict[str, Any]:
    """What `editstream status` and `GET /status` show: journal, lag, DLQ, edits/s, replicas."""
    now_ms = time.time() * 1000
    recent = store.r.xrevrange(store.keys.journal, count=1000)
    last_10s = sum(1 for _, f in recent if now_ms - float(f[b"at"]) <= 10_000)
    return {
        "journal": store.last_seq(),
        "compacted_below": store.compacted(),
        "facts_stream": store.facts_size(),
        "ingest_lag": store.ingest_lag(),
        "dlq": store.dlq_size(),
        "edits_per_s_10s": round(last_10s / 10, 1),
        "replicas": store.replica_heartbeats(),
    }
