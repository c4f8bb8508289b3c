"""The supervisor on real Ray and a real redis-server: an actor gone for good comes back under its
name (the gateway finds replicas by name), and one whose name Ray still holds is tried again later
instead of failing the supervising loop (what a lost node's actor looks like for a while)."""

from __future__ import annotations

import pytest
import ray

from services.wiring.system import System, SystemConfig

pytestmark = [pytest.mark.redis, pytest.mark.ray]


@ray.remote
class Squatter:
    def ping(self) -> bool:
        return True


def test_a_lost_actor_comes_back_under_its_name_once_ray_releases_it(ray_local, redis_server, tmp_path):
    config = SystemConfig(redis_url=redis_server.url, run_dir=str(tmp_path / "run"), namespace="sv")
    system = System(config)
    ingest = {"redis_url": redis_server.url, "namespace": "sv", "consumer": "ingest-0"}
    first = system._spawn("ingest", "ingest", ingest)
    ray.get(first.ping.remote())
    assert system.supervise() == []  # alive: left alone

    ray.kill(first, no_restart=True)
    squatter = Squatter.options(name="sv:ingest").remote()  # the name is still taken, as after a node loss
    ray.get(squatter.ping.remote())
    assert system.supervise(name_wait_s=1.0) == []  # not started: tried again at the next check
    assert system.handle("ingest") is first

    ray.kill(squatter)
    assert system.supervise(name_wait_s=10.0) == ["ingest"]
    replaced = system.handle("ingest")
    assert replaced is not first and ray.get(replaced.ping.remote())
    assert ray.get(ray.get_actor("sv:ingest").ping.remote())
    system.stop()
    assert system.actors == {}


def test_an_actor_still_in_its_constructor_is_not_replaced_for_a_ping_timeout(ray_local, redis_server, tmp_path):
    """A Ray actor answers nothing until its constructor is done (a replica loads its model there):
    replacing it for a ping timeout started the load over every 10 s, forever, on a loaded machine."""
    config = SystemConfig(redis_url=redis_server.url, run_dir=str(tmp_path / "run"), namespace="sg")
    system = System(config)
    ingest = {"redis_url": redis_server.url, "namespace": "sg", "consumer": "ingest-0"}
    first = system._spawn("ingest", "ingest", ingest)
    assert system.supervise(timeout_s=0.001) == []  # cannot have answered yet: still starting, left alone
    assert system.handle("ingest") is first
    assert system.supervise(timeout_s=0.001, start_grace_s=0.0) == ["ingest"]  # without the grace: replaced
    second = system.handle("ingest")
    assert second is not first and ray.get(second.ping.remote())
    assert system.supervise() == [] and "ingest" not in system._starting  # answered: no longer starting
    system.stop()
