"""A short chaos run (the `bench chaos` harness): mixed good, duplicate, supersede, retract and every
hostile kind of event while actors are SIGKILLed and Redis restarts; nothing lost or applied twice."""

from __future__ import annotations

import pytest

from editstream.hostile import HOSTILE
from services.bench.chaos import run_chaos

pytestmark = [pytest.mark.redis, pytest.mark.ray]


def test_short_chaos_run_with_recipe(ray_local, tmp_path):
    doc = run_chaos("recipe", minutes=0.5, run_dir=tmp_path, rate=15.0, kill_every_s=5.0)
    assert doc["lost"] == 0 and doc["converged"], doc
    assert not any(doc["applied_twice"].values()), doc["applied_twice"]
    assert doc["redis_restart"] and len([k for k in doc["kills"] if "at_s" in k]) >= 3, doc["kills"]
    assert all(k["recovered_s"] is not None for k in doc["kills"] if "at_s" in k), doc["kills"]
    assert not doc["bad_kinds_without_dlq"] and doc["bad_kinds_sent"] >= min(len(HOSTILE), doc["bad_sent"])
    assert set(doc["applied_per_replica"].values()) == {doc["journaled"]}
