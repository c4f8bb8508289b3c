"""Replica snapshots: the state comes back the same (digest, supersede stacks, answers), a snapshot
that does not fit is refused, and a replica service starts from one and replays only the tail.
Compaction below a snapshot: Redis keeps only the tail, a replica that starts from the snapshot
comes out the same as one that replayed everything, supersede and retract stay exact, and a replica
without snapshots (or a rollback) cannot reach below it."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from editstream.demo_facts import demo_facts
from editstream.errors import ArtifactError, NotReadyError
from editstream.methods import create_method
from editstream.models import EMBEDDED_LLM
from editstream.packs import read_index
from editstream.replica import Replica
from editstream.snapshot import SnapshotWriter, capture, load_snapshot, snapshots, write_snapshot
from services.bench import snapshots as snapshot_bench
from services.cli.commands import rollback
from services.transport.store import RedisStore, connect
from services.workers import replica_host
from services.workers.editor import Editor
from services.workers.ingest import content_hash
from services.workers.replica_host import ReplicaService
from tests.conftest import params_hash
from tests.test_poison import drain, journal
from tests.test_rome import FACTS, SAMPLES

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def edited_replica(lm):
    """A RECIPE replica after 5 edits, a supersede of the first and a retract of the third."""
    facts = demo_facts(5)
    newer = dataclasses.replace(facts[0], target="Atlantis", edit_id="newer-0")
    method = create_method("recipe", lm)
    replica = Replica(method)
    for seq, artifact in enumerate(method.compute([*facts, newer]), start=1):
        replica.apply(seq, artifact)
    replica.retract(7, facts[2].edit_id)
    return replica, facts, newer


def test_a_snapshot_brings_back_the_same_state_and_answers(real_lm, tmp_path):
    replica, facts, newer = edited_replica(real_lm)
    path = write_snapshot(capture(replica, (facts[2].edit_id, 1.0)), tmp_path)
    (info,) = snapshots(tmp_path, "recipe", real_lm.fingerprint)
    assert (info.path, info.seq, info.entry) == (path, 7, (facts[2].edit_id, 1.0))
    restored = Replica(create_method("recipe", real_lm))
    load_snapshot(restored, info)
    assert restored.version == 7 and restored.digest() == replica.digest()
    assert restored.method.active_edit_ids() == replica.method.active_edit_ids()
    prompts = [facts[0].prompt, facts[2].prompt, facts[4].prompt]
    assert [a.text for a in restored.generate(prompts, max_new_tokens=6)] == [
        a.text for a in replica.generate(prompts, max_new_tokens=6)
    ]
    # the supersede stack came back too: retracting the newer edit brings the first one back
    restored.retract(8, newer.edit_id)
    assert restored.method.is_active(facts[0].edit_id)


def test_a_snapshot_carries_the_ivf_lists_and_a_restart_searches_on_them(real_lm, tmp_path):
    """Past the ANN threshold the snapshot holds the key index's centroids (derived.safetensors); the
    restored replica's index is built on them (no k-means) and answers as the writer's; a snapshot
    whose derived file is damaged still loads, its lists trained anew."""
    facts = demo_facts(8)
    method = create_method("recipe", real_lm, ann_threshold=4)
    replica = Replica(method)
    for seq, artifact in enumerate(method.compute(facts), start=1):
        replica.apply(seq, artifact)
    method.retrieval.index.wait()  # the lists are trained on a thread; the writer's index is IVF once that is done
    assert type(method.retrieval.index.inner).__name__ == "IvfKeyIndex"
    path = write_snapshot(capture(replica, (facts[-1].edit_id, 1.0)), tmp_path)
    assert (path / "derived.safetensors").is_file()
    restored = Replica(create_method("recipe", real_lm, ann_threshold=4))
    load_snapshot(restored, snapshots(tmp_path)[0])
    got, want = restored.method.retrieval.index, method.retrieval.index
    assert torch.equal(got.training()["ivf_centroids"], want.training()["ivf_centroids"])
    assert restored.digest() == replica.digest()
    prompts = [f.prompt for f in facts[:3]] + ["Which city is the Eiffel Tower in?"]
    assert restored.method.retrieval.retrieve(prompts) == method.retrieval.retrieve(prompts)
    (path / "derived.safetensors").write_bytes(b"not safetensors")
    again = Replica(create_method("recipe", real_lm, ann_threshold=4))
    load_snapshot(again, snapshots(tmp_path)[0])
    again.method.retrieval.index.wait()  # trained anew, in the background
    assert again.digest() == replica.digest() and type(again.method.retrieval.index.inner).__name__ == "IvfKeyIndex"


def test_a_snapshot_that_does_not_fit_is_refused(real_lm, tmp_path):
    replica, facts, _ = edited_replica(real_lm)
    path = write_snapshot(capture(replica, (facts[2].edit_id, 1.0)), tmp_path)
    meta = json.loads((path / "snapshot.json").read_text())
    (path / "snapshot.json").write_text(json.dumps({**meta, "digest": "0" * 16}))
    restored = Replica(create_method("recipe", real_lm))
    with pytest.raises(ArtifactError, match="digest"):
        load_snapshot(restored, snapshots(tmp_path)[0])
    assert restored.version == 0 and not restored.method.edit_ids()
    with pytest.raises(ArtifactError, match="text-rag"):
        load_snapshot(Replica(create_method("text-rag", real_lm)), snapshots(tmp_path)[0])


@pytest.mark.redis
def test_a_replica_starts_from_the_snapshot_and_replays_only_the_tail(redis_server, tmp_path):
    store = RedisStore(connect(redis_server.url), "snap")
    facts = demo_facts(6)
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "snap")
    opts = {"snapshot_dir": str(tmp_path / "snaps"), "snapshot_every": 2}
    writer = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "snap", **opts)
    taken = []
    for part in (facts[:2], facts[2:4]):
        journal(store, part)
        drain(editor)
        drain(writer)
        taken.append([s.seq for s in snapshots(tmp_path / "snaps" / "snap")])
    assert taken == [[2], [4, 2]] and writer.snapshot_seq == 4
    # the second snapshot wrote only the two edits since the first and links the first one's pack
    index = read_index(snapshots(tmp_path / "snaps" / "snap")[0].path)
    assert [e.pack for e in index.entries] == ["pack-000000000002.bin"] * 2 + ["pack-000000000004.bin"] * 2
    journal(store, facts[4:])
    drain(editor)
    late = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-1", "snap", **opts)
    applied = []
    real_apply = late.replica.apply
    late.replica.apply = lambda seq, artifact: applied.append(seq) or real_apply(seq, artifact)
    drain(late)
    assert late.snapshot_seq == 4 and applied == [5, 6]  # loaded up to 4, replayed only the tail
    drain(writer)
    assert late.version == writer.version == 6 and late.replica.digest() == writer.replica.digest()
    # only replica-0 writes them, and the newest two are kept
    assert [s.seq for s in snapshots(tmp_path / "snaps" / "snap")] == [6, 4] and late.snapshot_seq == 4


@pytest.mark.redis
@pytest.mark.parametrize(
    ("method", "options", "facts"),
    [("scen", {"expert_steps": 2}, demo_facts(3)), ("rome", {"mom2_samples": SAMPLES}, FACTS)],
)
def test_snapshot_and_tail_equal_a_full_replay_for_scen_and_a_weight_method(
    redis_server, tmp_path, method, options, facts
):
    store = RedisStore(connect(redis_server.url), method)
    editor = Editor(redis_server.url, method, EMBEDDED_LLM, method, method_options=options)
    opts = {"snapshot_dir": str(tmp_path / "snaps"), "snapshot_every": 2, "method_options": options}
    writer = ReplicaService(redis_server.url, method, EMBEDDED_LLM, "replica-0", method, **opts)
    journal(store, facts[:2])
    drain(editor)
    drain(writer)
    journal(store, facts[2:])
    drain(editor)
    late = ReplicaService(redis_server.url, method, EMBEDDED_LLM, "replica-1", method, **opts)
    applied = []
    real_apply = late.replica.apply
    late.replica.apply = lambda seq, artifact: applied.append(seq) or real_apply(seq, artifact)
    drain(late)
    drain(writer)
    assert late.snapshot_seq == 2 and applied == [3]  # the snapshot, then only the tail
    assert late.version == writer.version == 3 and late.replica.digest() == writer.replica.digest()
    # the served model is the same: weights (ROME's deltas re-added in order) and answers
    lms = [r.replica.method.lm.model for r in (late, writer)]
    assert params_hash(lms[0]) == params_hash(lms[1])
    prompts = [f.prompt for f in facts]
    assert [a.text for a in late.replica.generate(prompts, max_new_tokens=4)] == [
        a.text for a in writer.replica.generate(prompts, max_new_tokens=4)
    ]


@pytest.mark.redis
def test_the_replica_applies_on_while_a_snapshot_is_written(redis_server, tmp_path, monkeypatch):
    store = RedisStore(connect(redis_server.url), "bg")
    facts = demo_facts(4)
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "bg")
    release, real_write = threading.Event(), SnapshotWriter.write

    def slow_write(self, state):  # a snapshot of many edits takes seconds to write
        release.wait(10)
        return real_write(self, state)

    monkeypatch.setattr(SnapshotWriter, "write", slow_write)
    opts = {"snapshot_dir": str(tmp_path / "snaps"), "snapshot_every": 2}
    writer = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "bg", **opts)
    journal(store, facts[:2])
    drain(editor)
    while writer.step():  # applies seqs 1-2; the snapshot at 2 starts and waits for `release`
        pass
    journal(store, facts[2:])
    drain(editor)
    while writer.step():
        pass
    assert writer.version == 4 and writer.snapshot_seq == 0  # applied on while the snapshot waited
    release.set()
    writer.wait_snapshot()
    assert writer.snapshot_seq == 2
    drain(writer)  # the snapshot due at 4 is taken at the next step
    assert [s.seq for s in snapshots(tmp_path / "snaps" / "bg")] == [4, 2]


def test_a_snapshot_the_journal_no_longer_holds_is_not_used(redis_server, tmp_path):
    store = RedisStore(connect(redis_server.url), "gone")
    facts = demo_facts(3)
    journal(store, facts)
    drain(Editor(redis_server.url, "recipe", EMBEDDED_LLM, "gone"))
    opts = {"snapshot_dir": str(tmp_path / "snaps"), "snapshot_every": 3}
    drain(ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "gone", **opts))
    assert [s.seq for s in snapshots(tmp_path / "snaps" / "gone")] == [3]
    store.r.delete(*store.r.keys("gone:*"))  # Redis lost everything: seq 3 is another fact now
    journal(store, demo_facts(4)[1:])
    fresh = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-1", "gone", **opts)
    fresh.step()
    assert fresh.snapshot_seq == 0  # not loaded: the journal at seq 3 names another edit


def retract_entry(store: RedisStore, edit_id: str, retract_id: str) -> None:
    """Append a retract of `edit_id` to the journal as ingest would."""
    payload = {"op": "retract", "edit_id": retract_id, "retracts": edit_id}
    store.journal_append(retract_id, content_hash(payload), payload, 0.0, retracts=edit_id)


@pytest.mark.redis
def test_compaction_below_a_snapshot_keeps_every_replica_exact(redis_server, tmp_path, capsys):
    store = RedisStore(connect(redis_server.url), "compact")
    facts = demo_facts(8)
    newer = dataclasses.replace(facts[0], target="Atlantis", edit_id="newer-0")  # supersedes facts[0]
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "compact")
    opts = {"snapshot_dir": str(tmp_path / "snaps"), "snapshot_every": 4}
    writer = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "compact", compact=True, **opts)
    journal(store, [*facts[:3], newer])
    drain(editor)
    drain(writer)
    # below the snapshot at 4: the journal keeps only entry 4 (a snapshot is checked against it), no artifact
    assert store.compacted() == 4 and store.r.xlen(store.keys.journal) == 1
    assert store.r.hlen(store.keys.artifacts) == 0
    retract_entry(store, facts[1].edit_id, "r-1")
    journal(store, facts[3:6])
    drain(editor)
    drain(writer)
    assert store.compacted() == 8 and store.r.hlen(store.keys.artifacts) == 0
    journal(store, facts[6:8])
    drain(editor)
    late = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-1", "compact", **opts)
    drain(late)
    drain(writer)
    assert late.snapshot_seq == 8 and late.version == writer.version == 10
    assert late.replica.digest() == writer.replica.digest()  # snapshot + tail == every entry replayed
    assert store.r.hlen(store.keys.artifacts) == 2  # the tail's two edits only
    # supersede and retract stay exact across compaction: retracting the newer edit (its artifact is
    # gone from Redis) brings the superseded one back on both
    retract_entry(store, newer.edit_id, "r-2")
    drain(editor)
    drain(late)
    drain(writer)
    for service in (late, writer):
        active = service.replica.method.active_edit_ids()
        assert facts[0].edit_id in active and newer.edit_id not in active and facts[1].edit_id not in active
    assert late.replica.digest() == writer.replica.digest()
    # a replica without the snapshot store cannot catch up, says so, and takes no queries
    bare = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-2", "compact")
    with pytest.raises(NotReadyError, match="compacted below seq 8 and this replica is at 0"):
        bare.step()
    assert not bare.ready and bare.version == 0
    # a rollback cannot reach below the compacted journal
    assert rollback(redis_server.url, "compact", 3, wait_s=0) == 2
    assert "the earliest version a rollback can reach is 7" in capsys.readouterr().err


@pytest.mark.redis
def test_the_snapshot_bench_measures_compaction_and_a_restart(tmp_path):
    doc = snapshot_bench.run(facts=20, tail=3, method="recipe", model=EMBEDDED_LLM, probes=4)
    assert doc["journal_entries"] == 20 + 2 + 1 and doc["live_edits"] == 19  # 10% superseded, 5% retracted
    assert doc["digests_agree"] and doc["restart_replayed_tail"] == 3
    # the restarted replica ran in a process of its own and reported its memory; then 4 facts went
    # through ingest, editor and both replicas one by one, each timed from XADD to applied on both
    model_rss = doc["restart_rss_model_bytes"]
    assert model_rss > 100e6 and doc["restart_rss_ready_bytes"] > 0.9 * model_rss
    assert doc["restart_process_ready_s"] >= doc["restart_ready_s"] > 0
    assert doc["edit_latency_facts"] == 4 and 0 < doc["edit_latency_p50_ms"] <= doc["edit_latency_max_ms"]
    assert doc["live_edits_at_end"] == 19 + 3 + 4
    assert doc["restart_loaded_snapshot_seq"] == doc["journal_entries"]
    before, after = doc["redis_bytes_before_compaction"], doc["redis_bytes_after_compaction"]
    assert "artifacts" in before and "artifacts" not in after  # every artifact below the snapshot went
    assert doc["journal_length_after_compaction"] == 1  # the snapshot's own entry
    # after the tail and the probes, an incremental snapshot writes the 7 new artifacts; a whole one all
    # 26 applied
    whole, incremental = doc["snapshot_write_whole_bytes"], doc["snapshot_write_incremental_bytes"]
    assert 0 < incremental < whole / 3


def one_replica(redis_server, namespace: str):
    """An editor and one replica on `namespace`, and `feed(facts)`: journal them, compute, apply."""
    store = RedisStore(connect(redis_server.url), namespace)
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, namespace)
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", namespace)

    def feed(facts) -> None:
        journal(store, facts)
        drain(editor)
        drain(replica)

    return feed, replica


@pytest.mark.redis
def test_applied_edits_are_frozen_out_of_the_collector_every_so_many_entries(redis_server, monkeypatch):
    """Every FREEZE_EVERY applied entries the replica moves what is alive (its applied edits) into
    the collector's permanent generation, so full collections stop walking a million edits, and
    gives the heap's free pages back (every replica, not only the snapshot writer)."""
    import gc

    monkeypatch.setattr(replica_host, "FREEZE_EVERY", 3)
    trims = []
    monkeypatch.setattr(replica_host, "trim_heap", lambda: trims.append(1))  # and the free pages handed back
    feed, replica = one_replica(redis_server, "freeze")
    facts = demo_facts(4)
    feed(facts[:2])
    before = gc.get_freeze_count()
    applied = replica.replica.method.applied()
    assert any(a is applied[0] for a in gc.get_objects())  # 2 applied: not frozen yet
    feed(facts[2:])
    assert replica.version == 4 and gc.get_freeze_count() > before and trims == [1]
    assert not any(a is applied[0] for a in gc.get_objects())  # in the permanent generation now
    gc.unfreeze()


@pytest.mark.redis
def test_a_heartbeat_does_not_hash_every_edit_each_time_but_asked_state_is_fresh(redis_server, monkeypatch):
    monkeypatch.setattr(replica_host, "DIGEST_MIN_S", 600.0)  # no second hash due within the test, however slow
    feed, replica = one_replica(redis_server, "beat")
    facts = demo_facts(3)
    feed(facts[:2])
    first = replica.state()
    assert (first["version"], first["digest_version"], first["edits"]) == (2, 2, 2)
    feed(facts[2:])
    # a heartbeat before the next hash is due keeps the last one, saying which version it is of
    beat = replica.state(fresh=False)
    assert (beat["version"], beat["digest_version"], beat["digest"]) == (3, 2, first["digest"])
    asked = replica.state()
    assert (asked["digest_version"], asked["digest"]) == (3, replica.replica.digest()) and asked["edits"] == 3


@pytest.mark.redis
def test_a_due_heartbeat_hashes_beside_the_apply_loop_and_the_next_carries_it(redis_server, monkeypatch):
    monkeypatch.setattr(replica_host, "DIGEST_MIN_S", 0.0)
    feed, replica = one_replica(redis_server, "beside")
    facts = demo_facts(3)
    feed(facts[:2])
    first = replica.state()
    release, real = threading.Event(), replica_host.state_digest

    def held(version, method, applied):
        assert release.wait(30)
        return real(version, method, applied)

    monkeypatch.setattr(replica_host, "state_digest", held)
    feed(facts[2:])  # a heartbeat in this drain starts the hash of version 3, held on its thread
    beat = replica.state(fresh=False)  # returns at once with the last digest taken
    assert (beat["version"], beat["digest_version"], beat["digest"]) == (3, 2, first["digest"])
    assert replica._hasher is not None and replica._hasher.is_alive()
    release.set()
    replica._hasher.join(30)
    beat = replica.state(fresh=False)
    assert (beat["digest_version"], beat["digest"]) == (3, replica.replica.digest())


@pytest.mark.redis
def test_a_state_hashes_the_edits_with_the_lock_free_and_keeps_no_hash_of_a_state_reset_meanwhile(
    redis_server, monkeypatch
):
    """The digest walks every live edit (seconds at a million): applies must not wait behind it."""
    store = RedisStore(connect(redis_server.url), "free")
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "free")
    replica = ReplicaService(redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "free")
    journal(store, demo_facts(2))
    drain(editor)
    drain(replica)
    real, seen = replica_host.state_digest, []

    def hashing(version, method, applied):
        seen.append(replica._lock.locked())
        return real(version, method, applied)

    monkeypatch.setattr(replica_host, "state_digest", hashing)
    replica._digest_cache = (-1, "", 0.0, 0.0)  # a heartbeat in the loop may have hashed this version
    asked = replica.state()
    assert seen == [False] and (asked["digest_version"], asked["digest"]) == (2, replica.replica.digest())

    def reset_meanwhile(version, method, applied):
        replica._resets += 1  # as `_start_over` does while the hash runs
        return real(version, method, applied)

    monkeypatch.setattr(replica_host, "state_digest", reset_meanwhile)
    replica._digest_cache = (-1, "", 0.0, 0.0)
    replica.state()
    assert replica._digest_cache[0] == -1  # the hash of the state before the reset is not kept
