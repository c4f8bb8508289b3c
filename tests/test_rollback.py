"""`editstream rollback --to-version K` with ROME in the pipeline: every replica returns to version K's
model (the later weight changes subtracted, newest first), through the journal like any retract."""

from __future__ import annotations

import pytest

from editstream.edits import EditRequest
from services.cli.commands import rollback, rollback_plan
from tests.pipeline_helpers import wait_converged
from tests.test_pipeline import start
from tests.test_rome import FACTS, SAMPLES

pytestmark = [pytest.mark.redis, pytest.mark.ray]


def test_rollback_returns_every_replica_to_version_k(ray_local, redis_server, tmp_path):
    system, store = start(redis_server.url, tmp_path, method="rome", mom2_samples=SAMPLES)
    try:

        def answers(version: int, fact: EditRequest) -> list[str]:
            return [
                system.ask([fact.prompt], replica=i, min_version=version, max_new_tokens=2)[0]["text"] for i in range(2)
            ]

        unedited = [answers(0, f) for f in FACTS]
        for f in FACTS:
            store.r.xadd(
                store.keys.facts, {"edit_id": f.edit_id, "prompt": f.prompt, "target": f.target, "subject": f.subject}
            )
        states = wait_converged(system, store, 3)
        assert all(a.strip().startswith(f.target) for f in FACTS for a in answers(3, f))
        assert rollback_plan(store, 1) == (["camry", "dd"], [])

        assert rollback(redis_server.url, store.keys.facts.split(":")[0], 1, wait_s=300) == 0
        after = wait_converged(system, store, 5)
        assert all(a.strip().startswith("Rome") for a in answers(5, FACTS[0]))  # edit 1 stays
        assert [answers(5, f) for f in FACTS[1:]] == unedited[1:]  # edits 2 and 3 are gone everywhere
        assert {s["edits"] for s in after} == {1} and states[0]["digest"] != after[0]["digest"]
        assert rollback(redis_server.url, store.keys.facts.split(":")[0], 1, wait_s=0) == 0  # nothing left to undo
        assert store.last_seq() == 5
    finally:
        system.stop()
