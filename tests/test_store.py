"""The Redis transport on a real redis-server: what `status` reports survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.transport.store import GroupReader, RedisStore, connect

pytestmark = pytest.mark.redis


def test_ingest_lag_is_counted_after_an_aof_reload_never_reported_as_zero(redis_server):
    store = RedisStore(connect(redis_server.url), "lagtest")
    reader = GroupReader(store.r, store.keys.facts, "ingest", "ingest-0", batch=2)
    for i in range(5):
        store.r.xadd(store.keys.facts, {"prompt": f"p{i}", "target": "t"})
    rows = reader.read()
    reader.ack([rows[0][0]])
    assert len(rows) == 2 and store.ingest_lag() == 3 + 1  # 3 never delivered + 1 delivered, not acked
    redis_server.stop()  # SIGTERM: the AOF is complete; on reload XINFO's entries-read and lag are nil
    redis_server.start()
    store = RedisStore(connect(redis_server.url), "lagtest")
    assert store.ingest_lag() == 3 + 1


def test_artifacts_are_write_once_per_journal_entry(redis_server):
    store = RedisStore(connect(redis_server.url), "once")
    assert store.put_artifacts("scen", {7: b"first"}) == []
    assert store.put_artifacts("scen", {7: b"second", 8: b"other"}) == [7]  # a slower editor's copy loses
    assert store.get_artifacts("scen", [7, 8, 9]) == {7: b"first", 8: b"other", 9: None}


def test_a_retracted_edit_can_come_back_and_be_retracted_again(redis_server):
    from services.workers.ingest import Ingestor

    ingest = Ingestor(redis_server.url, namespace="resend")
    fact = {b"edit_id": b"sky", b"prompt": b"The sky is", b"target": b"green"}
    retract = {b"op": b"retract", b"retracts": b"sky"}
    outcomes = [
        ingest.handle("1-0", fact),
        ingest.handle("2-0", retract),
        ingest.handle("3-0", {**retract, b"edit_id": b"again"}),  # the edit is already retracted
        ingest.handle("4-0", fact),  # re-sent after the retract (what `rollback` tells users to do)
        ingest.handle("5-0", fact),  # now it is in effect: a duplicate
        ingest.handle("6-0", retract),  # the same retract (same default id) works on the returned edit
    ]
    assert outcomes == ["accepted", "accepted", "dead_lettered", "accepted", "duplicate", "accepted"]
    ops = [(e.seq, e.payload["op"]) for e in ingest.store.journal_after(0)]
    assert ops == [(1, "edit"), (2, "retract"), (3, "edit"), (4, "retract")]
    (reason,) = [f[b"reason"].decode() for _, f in ingest.store.r.xrange(ingest.store.keys.dlq)]
    assert reason == "edit_id 'sky' is already retracted"


def test_rollback_plan_follows_the_journal_in_order(redis_server):
    from services.cli.commands import rollback_plan
    from services.workers.ingest import Ingestor

    ingest = Ingestor(redis_server.url, namespace="plan")
    facts = {i: {b"edit_id": i.encode(), b"prompt": f"Prompt {i} is".encode(), b"target": b"x"} for i in "abcd"}
    for n, event in enumerate(
        [
            facts["a"],  # seq 1: before the rollback point
            facts["d"],  # seq 2
            facts["b"],  # seq 3: after it
            {b"op": b"retract", b"retracts": b"a"},  # seq 4: a retract of an edit from before
            {b"op": b"retract", b"retracts": b"d"},  # seq 5: ... and d comes back at seq 6
            facts["d"],
            facts["c"],  # seq 7
        ]
    ):
        assert ingest.handle(f"{n + 1}-0", event) == "accepted"
    # to version 2: undo c and b (newest first); a stays retracted (lost); d is in effect as it was at 2
    assert rollback_plan(ingest.store, 2) == (["c", "b"], ["a"])


def test_consumed_facts_are_trimmed_and_pending_ones_kept(redis_server):
    store = RedisStore(connect(redis_server.url), "trim")
    reader = GroupReader(store.r, store.keys.facts, "ingest", "ingest-0", batch=3)
    for i in range(5):
        store.r.xadd(store.keys.facts, {"prompt": f"p{i}", "target": "t"})
    rows = reader.read()
    reader.ack([rows[0][0]])  # entry 0 acked, entries 1-2 delivered but pending, 3-4 never read
    reader.trim_consumed()
    assert [f[b"prompt"] for _, f in store.r.xrange(store.keys.facts)] == [b"p1", b"p2", b"p3", b"p4"]
    reader.ack([r[0] for r in rows[1:]])
    reader.ack([r[0] for r in reader.read()])
    reader.trim_consumed()
    assert store.facts_size() == 0 and store.ingest_lag() == 0


def test_a_private_redis_server_starts_in_a_relative_directory(tmp_path, monkeypatch):
    """redis-server changes into its --dir before it opens its log: a relative run dir must still work."""
    from services.transport.redis_server import RedisServer, reachable

    monkeypatch.chdir(tmp_path)
    with RedisServer(directory=Path("runs") / "x" / "redis") as server:
        assert reachable(server.url)
    assert (tmp_path / "runs" / "x" / "redis" / "redis.log").is_file()
