"""Ingest: read fact events with a consumer group, validate, dedup, journal, then XACK.

Order per entry is read -> handle -> ack: an entry is acked only after it is journaled or
dead-lettered, so a crash in between re-delivers it and the journal's dedup makes that harmless.
On start the consumer first re-reads its own pending entries (id 0), then claims entries that
another consumer left idle (XAUTOCLAIM), then reads new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging

import redis

from editstream.errors import InvalidEditError
from editstream.events import Retract, edit_to_payload, parse_event
from services.transport.store import GroupReader, RedisStore, connect
from services.workers.prometheus import Metrics

log = logging.getLogger(__name__)

TRIM_EVERY = 10  # steps between trims of the consumed part of the facts stream


def content_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class Ingestor:
    """The ingest loop as a plain class; `services.wiring.system` wraps it in a Ray actor."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = "editstream",
        group: str = "ingest",
        consumer: str = "ingest-0",
        batch: int = 256,
        block_ms: int = 100,
        claim_idle_ms: int = 10000,
    ) -> None:
        self.store = RedisStore(connect(redis_url), namespace)
        self.counts = {"accepted": 0, "duplicate": 0, "dead_lettered": 0}
        self.metrics = Metrics(consumer)
        self.reader = GroupReader(self.store.r, self.store.keys.facts, group, consumer, batch, block_ms, claim_idle_ms)
        self._steps = 0

    def handle(self, entry_id: str, fields: dict[bytes, bytes]) -> str:
        """Journal or dead-letter one entry; returns what happened."""
        at_ms = float(entry_id.split("-")[0])
        try:
            event = parse_event(fields)
        except InvalidEditError as exc:
            self.store.dead_letter(entry_id, fields, str(exc))
            return "dead_lettered"
        if isinstance(event, Retract):
            payload = {"op": "retract", "edit_id": event.edit_id, "retracts": event.retracts}
            status, seq = self.store.journal_append(
                event.edit_id, content_hash(payload), payload, at_ms, retracts=event.retracts
            )
        else:
            payload = edit_to_payload(event)
            status, seq = self.store.journal_append(event.edit_id, content_hash(payload), payload, at_ms)
        if status == "new":
            return "accepted"
        if status == "dup":
            return "duplicate"
        reason = {
            "conflict": f"edit_id {getattr(event, 'edit_id', '')!r} was already used (seq {seq}) with other content",
            "unknown": f"retract of unknown edit_id {getattr(event, 'retracts', '')!r}",
            "retracted": f"edit_id {getattr(event, 'retracts', '')!r} is already retracted",
        }[status]
        self.store.dead_letter(entry_id, fields, reason)
        return "dead_lettered"

    def step(self) -> int:
        """Handle one batch; returns how many entries were handled."""
        entries = self.reader.read()
        done = []
        for entry_id, fields in entries:
            eid = entry_id.decode()
            try:
                outcome = self.handle(eid, fields)
                self.counts[outcome] += 1
                if outcome == "accepted":
                    self.metrics.accepted.inc()
                elif outcome == "dead_lettered":
                    self.metrics.dead_lettered.inc()
                done.append(entry_id)
            except redis.RedisError:
                raise
            except Exception:  # a poison message must not stop the stream
                log.exception("unexpected error on %s; dead-lettering it", eid)
                self.store.dead_letter(eid, fields, "internal error while validating")
                done.append(entry_id)
        self.reader.ack(done)
        self._steps += 1
        if done and self._steps % TRIM_EVERY == 0:
            self.reader.trim_consumed()  # the journal holds what was accepted: the facts stream stays short
        return len(entries)

    def stats(self) -> dict:
        return dict(self.counts)
