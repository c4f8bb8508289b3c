"""Faults inside the services, on a real redis-server with the real RECIPE method on the embedded
model (failures are injected into it): poison entries are dead-lettered after a bounded number of
tries and skipped identically on every replica; a replica that has not replayed does not answer;
services start while Redis is down; a replica notices when Redis handed its seqs to other facts."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from editstream.arrowlog import read_log
from editstream.artifacts import Artifact
from editstream.demo_facts import demo_facts
from editstream.errors import NotReadyError
from editstream.events import edit_to_payload
from editstream.models import EMBEDDED_LLM
from services.transport.redis_server import RedisServer, free_port
from services.transport.store import RedisStore, connect
from services.workers.editor import Editor
from services.workers.ingest import Ingestor, content_hash
from services.workers.replica_host import ReplicaService

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("keep_torch_threads")]


def journal(store: RedisStore, facts) -> None:
    """Append facts to the journal as ingest would."""
    for fact in facts:
        payload = edit_to_payload(fact)
        store.journal_append(fact.edit_id, content_hash(payload), payload, 0.0)


def drain(service) -> None:
    """Step a service until a step finds nothing to do (and a replica's snapshot in flight is written)."""
    while service.step():
        pass
    if hasattr(service, "wait_snapshot"):
        service.wait_snapshot()


def test_poison_entries_are_dead_lettered_and_skipped_on_every_replica(redis_server):
    store = RedisStore(connect(redis_server.url), "poison")
    facts = demo_facts(4)
    journal(store, facts)
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "poison", max_tries=2)
    real_compute = editor.method.compute

    def compute(edits):  # the second fact's compute always fails
        if any(e.edit_id == facts[1].edit_id for e in edits):
            raise RuntimeError("boom")
        return real_compute(edits)

    editor.method.compute = compute
    drain(editor)
    # the third fact's stored artifact cannot be applied: an encoding of the wrong shape
    good = Artifact.from_bytes(store.get_artifacts("recipe", [3])[3])
    store.r.hdel(store.keys.artifacts, "recipe:3")
    broken = Artifact(
        good.method,
        good.edit_id,
        good.base_fingerprint,
        {**good.tensors, "encoding": good.tensors["encoding"][:1]},
        good.meta,
    )
    store.put_artifacts("recipe", {3: broken.to_bytes()})
    replicas = [
        ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, f"replica-{i}", "poison", max_tries=2)
        for i in range(2)
    ]
    for replica in replicas:
        for _ in range(10):
            try:
                replica.step()
            except Exception:  # the service's loop logs and retries a failed step
                continue
            if replica.version == len(facts):
                break
    assert [r.version for r in replicas] == [4, 4]
    assert replicas[0].replica.digest() == replicas[1].replica.digest()
    assert replicas[0].replica.method.edit_ids() == [facts[0].edit_id, facts[3].edit_id]
    dead = store.dead([1, 2, 3, 4])
    assert dead[1] is None and dead[4] is None
    assert (dead[2]["stage"], dead[2]["tries"], dead[2]["edit_id"]) == ("compute", 2, facts[1].edit_id)
    assert "boom" in dead[2]["error"] and dead[3]["stage"] == "apply"
    assert store.r.xlen(store.keys.journal_dlq) == 2


def test_a_replica_that_has_not_replayed_does_not_answer_unless_asked_for_any_version(redis_server):
    store = RedisStore(connect(redis_server.url), "ready")
    facts = demo_facts(3)
    journal(store, facts)
    drain(Editor(redis_server.url, "recipe", EMBEDDED_LLM, "ready"))
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "ready")
    with pytest.raises(NotReadyError, match="replaying the journal"):
        replica.ask([facts[1].prompt], 4, timeout_s=0.2)
    (stale,) = replica.ask([facts[1].prompt], 4, any_version=True)
    assert stale["version"] == 0 and stale["fired"] is None
    assert not replica.state()["ready"]
    drain(replica)
    (fresh,) = replica.ask([facts[1].prompt], 4)
    assert fresh["version"] == 3 and fresh["fired"] == facts[1].edit_id and replica.state()["ready"]


def test_a_restarted_replica_is_ready_once_it_has_applied_everything_computed(redis_server):
    # The journal head is ahead of the editors (SCEN computes slowly): a replica that has applied
    # every computed entry is as far as any replica can be, and must not wait for the backlog.
    store = RedisStore(connect(redis_server.url), "backlog")
    facts = demo_facts(4)
    journal(store, facts[:2])
    drain(Editor(redis_server.url, "recipe", EMBEDDED_LLM, "backlog"))
    journal(store, facts[2:])  # journaled, not computed
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "backlog")
    drain(replica)
    assert replica.version == 2 and replica.catch_up_to == 4
    assert replica.state()["ready"]
    (answer,) = replica.ask([facts[1].prompt], 4, timeout_s=0.2)
    assert answer["version"] == 2 and answer["fired"] == facts[1].edit_id


def test_services_start_while_redis_is_down_and_connect_in_their_loop(tmp_path):
    server = RedisServer(port=free_port(), directory=tmp_path / "redis")
    replica = ReplicaService(server.url, "recipe", EMBEDDED_LLM, "replica-0", "down")  # nothing listens yet
    ingest = Ingestor(server.url, namespace="down")
    with pytest.raises(redis.ConnectionError):
        replica.step()  # the service's loop logs this and tries again
    with server:
        assert ingest.step() == 0
        replica.step()
        assert replica.state()["ready"] and replica.version == 0


def test_a_replica_detects_seqs_reused_after_redis_lost_writes_and_rebuilds(redis_server):
    store = RedisStore(connect(redis_server.url), "lost")
    facts = demo_facts(5)
    journal(store, facts[:3])
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "lost")
    drain(editor)
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "lost")
    drain(replica)
    assert replica.version == 3
    # Redis loses its last two writes (as after a failover): seqs 2 and 3 go to other facts
    ((first_id, first_fields),) = store.r.xrange(store.keys.journal, count=1)
    store.r.delete(store.keys.journal)
    store.r.xadd(store.keys.journal, first_fields, id=first_id)
    store.r.set(store.keys.seq, 1)
    store.r.hdel(store.keys.ids, facts[1].edit_id, facts[2].edit_id)
    store.r.hdel(store.keys.artifacts, "recipe:2", "recipe:3")
    journal(store, facts[3:])
    editor.reader._pending_done = editor.reader._group_ready = False  # its group went with the stream
    drain(editor)
    replica._checked = 0.0  # the check runs once a second
    for _ in range(5):
        replica.step()
    assert replica.version == 3
    assert replica.replica.method.edit_ids() == [facts[0].edit_id, facts[3].edit_id, facts[4].edit_id]


def test_edits_apply_while_a_query_decodes_and_the_answer_names_the_version_it_read(redis_server):
    """RECIPE copies what a generation needs when its plan is built, so applying a journal entry
    does not wait for a generation to finish; the answer reports the version its plan saw."""

    store = RedisStore(connect(redis_server.url), "interleave")
    facts = demo_facts(3)
    journal(store, facts[:2])
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "interleave")
    drain(editor)
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "interleave")
    drain(replica)
    journal(store, facts[2:])
    drain(editor)
    decoding, applied, answers, done = threading.Event(), threading.Event(), [], []
    real_forward = replica.replica.lm.model.forward

    def forward(*args, **kwargs):  # the query's first forward waits (5 s at most) for the apply
        if not decoding.is_set():
            decoding.set()
            applied.wait(5)
        return real_forward(*args, **kwargs)

    def query() -> None:
        answers.extend(replica.ask([facts[0].prompt], 8))
        done.append(time.monotonic())

    replica.replica.lm.model.forward = forward
    try:
        thread = threading.Thread(target=query)
        thread.start()
        assert decoding.wait(30)
        drain(replica)  # the third fact's entry
        applied_at = time.monotonic()
        applied.set()
        thread.join(60)
    finally:
        replica.replica.lm.model.forward = real_forward
    assert replica.version == 3 and applied_at < done[0]  # applied before the query ended
    assert answers[0]["version"] == 2 and answers[0]["fired"] == facts[0].edit_id


def test_entries_applied_before_redis_goes_down_mid_step_are_logged(tmp_path):
    """A step applies entries 1-2, then Redis goes down as it asks whether entry 3 (not computed yet)
    was dead-lettered: the two applied entries keep their rows in the edit log (they were dropped
    with the failed step's rows before)."""
    with RedisServer(port=free_port(), directory=tmp_path / "redis") as server:
        store = RedisStore(connect(server.url), "gap")
        facts = demo_facts(3)
        journal(store, facts[:2])
        drain(Editor(server.url, "recipe", EMBEDDED_LLM, "gap"))
        journal(store, facts[2:])  # journaled, no artifact yet
        replica = ReplicaService(server.url, "recipe", EMBEDDED_LLM, "replica-0", "gap", run_dir=str(tmp_path / "run"))
        real_dead = replica.store.dead

        def dead_after_an_outage(seqs):
            server.kill()  # a real outage, at the moment the step asks about entry 3
            return real_dead(seqs)

        replica.store.dead = dead_after_an_outage
        with pytest.raises(redis.ConnectionError):
            replica.step()
        assert replica.version == 2  # entries 1 and 2 took effect before the outage
        replica.flush()
        assert read_log(tmp_path / "run", "edits").column("seq").to_pylist() == [1, 2]
