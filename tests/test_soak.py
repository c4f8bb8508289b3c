"""`bench soak` on a real redis-server, real Ray and RECIPE, in miniature: nothing lost, digests
agree, compaction keeps the journal bounded by the snapshot interval, the samples reach the Arrow log."""

from __future__ import annotations

import pytest

from editstream.arrowlog import read_log
from services.bench.soak import SoakOptions, plot, run_soak

pytestmark = [pytest.mark.redis, pytest.mark.ray]


def test_a_short_soak_loses_nothing_and_stays_bounded(ray_local, redis_server, tmp_path):
    options = SoakOptions(facts=60, rate=40, replicas=1, every_s=0.5, snapshot_every=20, supersede=0.1, retract=0.1)
    doc = run_soak(redis_server.url, tmp_path, options)

    sent = doc["sent"]
    assert sent["edit"] == 60 and sent["supersede"] > 0 and sent["retract"] > 0
    assert doc["lost"] == 0 and doc["digests_agree"]
    assert doc["journaled"] == sum(sent.values()) == doc["applied_per_replica"]["replica-0"]
    assert doc["live_edits"]["replicas"] == [doc["live_edits"]["expected"]]
    assert doc["compacted_below"] >= 20  # snapshots were taken and Redis compacted below them
    samples = read_log(tmp_path / "run", "soak")
    assert samples.num_rows == doc["samples"] >= 2
    assert samples.column("journal_len").to_pylist()[-1] <= options.snapshot_every + 1
    assert doc["latency_by_tenth"] and all(t["p99_ms"] >= t["p50_ms"] > 0 for t in doc["latency_by_tenth"])
    plot(tmp_path / "run", tmp_path / "soak.png", "test")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
