"""The monitor sees forgetting: on one stream, ft forgets old edits and RECIPE does not."""

from __future__ import annotations

import time

import pytest

from editstream.arrowlog import read_log
from editstream.demo_facts import demo_facts
from editstream.events import event_fields
from editstream.monitoring import AlarmThresholds, alarms, retention_by_age
from services.cli.monitor import render
from services.transport.store import RedisStore, connect
from services.wiring.system import System, SystemConfig
from tests.pipeline_helpers import wait_converged

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.slow]  # about 3 min on an idle 2-core machine

FACTS = demo_facts(34)[10:]  # 24 template facts on three relations: they interfere under fine-tuning


def run_stream(redis_url: str, run_dir, method: str, options: dict):
    namespace = f"forget-{method}-{time.time_ns()}"
    config = SystemConfig(
        redis_url=redis_url,
        run_dir=str(run_dir),
        method=method,
        replicas=1,
        evaluators=1,
        eval_budget=0.3,
        namespace=namespace,
        method_options=options,
    )
    system = System(config).start()
    store = RedisStore(connect(redis_url), namespace)
    try:
        for f in FACTS:
            store.r.xadd(store.keys.facts, event_fields(f))
        wait_converged(system, store, len(FACTS), timeout_s=600)
        deadline = time.time() + 600
        while old_probes(read_log(run_dir, "eval")) < 30:  # enough probes of edits >= 10 edits old
            assert time.time() < deadline, "the evaluator did not probe enough old edits in 600 s"
            time.sleep(1.0)
    finally:
        system.stop()
    return read_log(run_dir, "eval")


def old_probes(evals) -> int:
    return sum(b["n"] for b in retention_by_age(evals) if b["lo"] >= 10)


def old_and_young(evals) -> tuple[float, float]:
    buckets = retention_by_age(evals)
    old = [b for b in buckets if b["lo"] >= 10]
    young = [b for b in buckets if b["lo"] < 3]
    score = lambda bs: sum(b["score"] * b["n"] for b in bs) / sum(b["n"] for b in bs)  # noqa: E731
    return score(old), score(young)


def test_ft_forgets_recipe_retains_and_only_ft_raises_the_alarm(ray_local, redis_server, tmp_path, trained_checkpoint):
    thresholds = AlarmThresholds(retention=0.7, locality=0.5, min_age=10, min_probes=20)
    ft = run_stream(redis_server.url, tmp_path / "ft", "ft", {"steps": 8, "lr": 5e-3})
    recipe = run_stream(redis_server.url, tmp_path / "recipe", "recipe", {"checkpoint": str(trained_checkpoint)})

    ft_old, ft_young = old_and_young(ft)
    recipe_old, recipe_young = old_and_young(recipe)
    assert ft_old < ft_young - 0.2, (ft_old, ft_young)  # retention falls with age under ft
    assert recipe_old >= 0.85 and recipe_old >= recipe_young - 0.1, (recipe_old, recipe_young)  # flat

    assert any(a.startswith("RETENTION") for a in alarms(ft, thresholds))
    assert alarms(recipe, thresholds) == []
    assert "ALARM: RETENTION" in render(None, tmp_path / "ft", thresholds)
    assert "alarms: none" in render(None, tmp_path / "recipe", thresholds)
