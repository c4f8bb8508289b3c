"""The streaming pipeline on a real redis-server and real Ray: exactly-once effect under failures."""

from __future__ import annotations

import json
import time

import pytest

from editstream.arrowlog import read_log
from editstream.demo_facts import demo_facts
from editstream.hostile import HOSTILE as BAD
from services.transport.store import RedisStore, connect
from services.wiring.system import System, SystemConfig
from tests.pipeline_helpers import assert_exactly_once, feed_in_thread, kill9, wait_converged, wait_journal

pytestmark = [pytest.mark.redis, pytest.mark.ray]


def start(
    redis_url: str,
    tmp_path,
    method: str = "recipe",
    replicas: int = 2,
    evaluators: int = 0,
    editors: int = 1,
    **opts,
):
    """The pipeline with a real method (RECIPE with the packaged checkpoint unless told)."""
    config = SystemConfig(
        redis_url=redis_url,
        run_dir=str(tmp_path / "run"),
        method=method,
        replicas=replicas,
        evaluators=evaluators,
        editors=editors,
        eval_budget=0.5,
        namespace=f"t{time.time_ns()}",
        method_options=opts,
    )
    return System(config).start(), RedisStore(connect(redis_url), config.namespace)


def test_bad_events_go_to_the_dlq_while_good_facts_apply(ray_local, redis_server, tmp_path):
    system, store = start(redis_server.url, tmp_path, evaluators=1)
    try:
        facts = demo_facts(60)
        bad = list(BAD.values())
        extra_bad = [
            ({"op": "edit", "edit_id": facts[0].edit_id, "prompt": "Another prompt", "target": "x"}, "already used"),
            ({"op": "retract", "retracts": "never-seen"}, "unknown edit_id"),
        ]
        for i, f in enumerate(facts):
            from editstream.events import event_fields

            store.r.xadd(store.keys.facts, event_fields(f))
            if i < len(bad):
                store.r.xadd(store.keys.facts, bad[i][0])
        store.r.xadd(store.keys.facts, event_fields(facts[1]))  # the same fact again: applied once, not an error
        for fields, _ in extra_bad:
            store.r.xadd(store.keys.facts, fields)
        states = wait_converged(system, store, len(facts))
        assert states[0]["version"] == len(facts)
        assert_exactly_once(store, facts)
        dlq = store.r.xrange(store.keys.dlq)
        reasons = [fields[b"reason"].decode() for _, fields in dlq]
        assert len(reasons) == len(bad) + len(extra_bad)
        for (_, expected), reason in zip(bad + extra_bad, reasons, strict=True):
            assert __import__("re").search(expected, reason), (expected, reason)
        assert system.stats("ingest")["duplicate"] == 1
        assert system.wait_for_evaluation(rounds=1, timeout_s=300)  # one round holds both kinds
        evals = read_log(tmp_path / "run", "eval")
        assert evals.num_rows > 0 and set(evals.column("kind").to_pylist()) >= {"reliability", "locality"}
    finally:
        system.stop()


@pytest.mark.parametrize("victim", ["ingest", "editor-0", "replica-1", "evaluator-0"])
def test_kill9_mid_stream_loses_nothing_and_applies_once(ray_local, redis_server, tmp_path, victim):
    system, store = start(redis_server.url, tmp_path, evaluators=int(victim.startswith("evaluator")))
    try:
        facts = demo_facts(2000)
        feeder = feed_in_thread(store, facts)
        wait_journal(store, 400)
        kill9(system, victim)
        feeder.join()
        wait_converged(system, store, len(facts))
        assert_exactly_once(store, facts)
        system.stop()  # closes the logs
        edits = read_log(tmp_path / "run", "edits").select(["replica", "seq"]).to_pylist()
        for replica in ("replica-0", "replica-1"):  # a restarted replica logs each entry once, not twice
            seqs = [r["seq"] for r in edits if r["replica"] == replica]
            assert sorted(seqs) == list(range(1, len(facts) + 1)), (replica, len(seqs), len(set(seqs)))
    finally:
        system.stop()


def test_scen_with_two_editors_survives_an_editor_kill_and_replicas_agree(ray_local, redis_server, tmp_path):
    """SCEN's compute depends on the editor's own history: with two editors sharing the journal and
    one killed mid-stream, every replica still applies the one stored artifact per entry."""
    system, store = start(redis_server.url, tmp_path, method="scen", editors=2, expert_steps=2)
    try:
        facts = demo_facts(16)
        feeder = feed_in_thread(store, facts)
        wait_journal(store, 4)
        kill9(system, "editor-0")
        feeder.join()
        states = wait_converged(system, store, len(facts), timeout_s=600)
        assert_exactly_once(store, facts)
        assert len({s["digest"] for s in states}) == 1 and states[0]["edits"] == len(facts)
    finally:
        system.stop()


def test_redis_restart_with_aof_mid_stream(ray_local, redis_server, tmp_path):
    system, store = start(redis_server.url, tmp_path)
    try:
        facts = demo_facts(2000)
        feeder = feed_in_thread(store, facts, rate=400)
        wait_journal(store, 300)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()
        feeder.join()
        wait_converged(system, store, len(facts))
        assert_exactly_once(store, facts)
        system.stop()  # closes the logs
        edits = read_log(tmp_path / "run", "edits").select(["replica", "seq"]).to_pylist()
        for replica in ("replica-0", "replica-1"):  # a restarted replica logs each entry once, not twice
            seqs = [r["seq"] for r in edits if r["replica"] == replica]
            assert sorted(seqs) == list(range(1, len(facts) + 1)), (replica, len(seqs), len(set(seqs)))
    finally:
        system.stop()


def test_replica_added_and_removed_mid_stream(ray_local, redis_server, tmp_path):
    system, store = start(redis_server.url, tmp_path)
    try:
        facts = demo_facts(2000)
        feeder = feed_in_thread(store, facts, rate=500)
        wait_journal(store, 300)
        added = system.add("replica")
        system.remove("replica", "replica-0")
        feeder.join()
        states = wait_converged(system, store, len(facts))
        assert {s["name"] for s in states} == {"replica-1", added}
        assert_exactly_once(store, facts)
    finally:
        system.stop()


def test_supersede_and_retract_change_answers_on_every_replica(ray_local, redis_server, tmp_path, trained_checkpoint):
    system, store = start(redis_server.url, tmp_path, method="recipe", checkpoint=str(trained_checkpoint))
    prompt = "The capital of France is"
    try:

        def answers(version: int) -> list[str]:
            return [
                system.ask([prompt], replica=i, min_version=version, max_new_tokens=4)[0]["text"].strip()
                for i in range(2)
            ]

        before = answers(0)
        assert all("Paris" in a for a in before), before
        store.r.xadd(store.keys.facts, {"edit_id": "v1", "prompt": prompt, "target": "Lyon"})
        wait_converged(system, store, 1)
        assert all(a.startswith("Lyon") for a in answers(1))
        store.r.xadd(
            store.keys.facts,
            {
                "edit_id": "v2",
                "prompt": prompt,
                "target": "Marseille",
                "paraphrases": json.dumps(["France's capital is"]),
            },
        )
        wait_converged(system, store, 2)
        assert all(a.startswith("Marseille") for a in answers(2))
        store.r.xadd(store.keys.facts, {"op": "retract", "retracts": "v2"})
        wait_converged(system, store, 3)
        assert all(a.startswith("Lyon") for a in answers(3))  # as before v2: v1 holds again
        store.r.xadd(store.keys.facts, {"op": "retract", "retracts": "v1"})
        wait_converged(system, store, 4)
        assert answers(4) == before  # as before any edit
    finally:
        system.stop()


def test_metrics_reach_rays_prometheus_export(ray_local, redis_server, tmp_path):
    import urllib.request

    system, store = start(redis_server.url, tmp_path, replicas=1)
    try:
        feed_in_thread(store, demo_facts(5)).join()
        wait_converged(system, store, 5)
        port = ray_local.nodes()[0]["MetricsExportPort"]
        deadline, text = time.time() + 90, ""
        while time.time() < deadline and "editstream_applied_edits" not in text:
            time.sleep(2.0)  # Ray exports metrics every few seconds
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        for name in ("editstream_applied_edits", "editstream_accepted_facts", "editstream_edit_latency_ms"):
            assert name in text, f"{name} not in Ray's metrics export on port {port}"
    finally:
        system.stop()
