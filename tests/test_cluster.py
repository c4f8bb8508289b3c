"""A real 3-node Ray cluster on this machine: `editstream serve --address` with replicas on two
worker nodes, one worker node lost mid-stream, a replacement node added and the replicas scaled
with `editstream scale`, queries answered over HTTP throughout."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from editstream.demo_facts import demo_facts
from services.transport.redis_server import free_port
from services.transport.store import RedisStore, connect
from services.wiring.cluster import LocalCluster, NodeSpec, load_spec
from services.wiring.placement import Resources, actor_options
from tests.pipeline_helpers import assert_exactly_once, feed_in_thread, wait_journal

REPO = Path(__file__).resolve().parents[1]
TOKEN = "cluster-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_placement_follows_slots_and_gpus():
    cpu_only = {"CPU": 4.0}
    assert actor_options("replica", Resources(), cpu_only)["num_gpus"] == 0
    assert actor_options("replica", Resources(), {"CPU": 4.0, "GPU": 2.0})["num_gpus"] == 1
    assert actor_options("replica", Resources(replica_gpus=0.5), {"GPU": 1.0})["num_gpus"] == 0.5
    slotted = {"CPU": 4.0, "editstream_replica": 2.0, "editstream_control": 4.0}
    assert actor_options("replica", Resources(), slotted)["resources"] == {"editstream_replica": 1.0}
    assert actor_options("evaluator", Resources(), slotted)["resources"] == {"editstream_control": 1.0}
    assert actor_options("editor", Resources(editor_cpus=2), slotted) == {
        "num_cpus": 2,
        "num_gpus": 0.0,
        "resources": {},
        "scheduling_strategy": "SPREAD",
    }
    with pytest.raises(ValueError, match="'router'"):
        actor_options("router", Resources(), cpu_only)


def test_local_cluster_file_is_checked(tmp_path):
    specs = load_spec(REPO / "cluster" / "local.yaml")
    assert [s.name for s in specs] == ["head", "worker-1", "worker-2"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - {name: a, cpu: 1}\n")
    with pytest.raises(ValueError, match="node 0"):
        load_spec(bad)


def status(client: httpx.Client) -> dict:
    return client.get("/status").json()


def wait_for(
    check, what: str, timeout_s: float, client: httpx.Client, serve=None, serve_log: Path | None = None
) -> dict:
    """The gateway's status once `check` holds; an AssertionError (with the tail of `serve_log`) at the
    deadline, or as soon as the `serve` process has exited."""
    deadline = time.time() + timeout_s
    last: dict = {}
    while time.time() < deadline and (serve is None or serve.poll() is None):
        try:
            last = status(client)
            if check(last):
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    ended = (
        f"serve exited with code {serve.returncode}" if serve is not None and serve.poll() is not None else "timed out"
    )
    tail = serve_log.read_text(errors="replace")[-3000:] if serve_log is not None else ""
    raise AssertionError(f"{ended} waiting for {what}; last status: {last}\n{tail}")


def converged(n: int, journal: int):
    def check(s: dict) -> bool:
        fresh = {k: r for k, r in s["replicas"].items() if time.time() - r["time"] < 10}
        states = {(r["version"], r["digest"]) for r in fresh.values()}
        return len(fresh) == n and len(states) == 1 and s["journal"] == journal and next(iter(states))[0] == journal

    return check


def query_loop(url: str, stop: threading.Event, log: list) -> threading.Thread:
    """Ask one completion after another until `stop`, logging (started, finished, status) per query."""

    def run() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                started = time.time()
                try:
                    r = c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 2})
                    log.append((started, time.time(), r.status_code))
                except httpx.HTTPError:
                    log.append((started, time.time(), -1))
                time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.ray
@pytest.mark.redis
def test_three_node_cluster_survives_losing_a_worker_node(redis_server, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # this test joins its own cluster
    facts = demo_facts(200)
    ns = "cl"
    store = RedisStore(connect(redis_server.url), ns)
    port = free_port()
    cluster = LocalCluster(load_spec(REPO / "cluster" / "local.yaml")).start()
    serve_log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    editstream = str(Path(sys.executable).with_name("editstream"))
    env = {**os.environ, **cluster.client_env, "EDITSTREAM_HTTP_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    serve = subprocess.Popen(
        [editstream, "serve", "--address", cluster.address, "--redis-url", redis_server.url, "--namespace", ns,
         "--replicas", "2", "--evaluators", "0", "--run-dir", str(tmp_path / "run"), "--http", "--http-port",
         str(port)],
        stdout=serve_log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    stop_queries, queries = threading.Event(), []
    try:
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, headers=AUTH, timeout=30)
        wait = functools.partial(wait_for, client=client, serve=serve, serve_log=tmp_path / "serve.log")
        wait(lambda s: len(s["ready_replicas"]) == 2, "2 ready replicas", 300)

        placed = {name: r["node"] for name, r in status(client)["replicas"].items()}
        assert sorted(placed.values()) == ["worker-1", "worker-2"], f"replicas not spread over the workers: {placed}"

        query_loop(url, stop_queries, queries)
        feeder = feed_in_thread(store, facts, rate=20)
        wait_journal(store, 60)
        victim = placed["replica-0"]
        killed_at = time.time()
        cluster.stop_node(victim)
        feeder.join()
        wait_journal(store, len(facts))
        final = wait(converged(2, len(facts)), "the 2 replicas to converge after the node loss", 300)
        recovered_at = time.time()
        assert_exactly_once(store, facts)
        placed_after = {name: r["node"] for name, r in final["replicas"].items()}
        assert victim not in placed_after.values(), placed_after

        # every query in flight at any moment of the window counts, including one that spans all of it;
        # one still in flight at recovery is waited for (up to the client's timeout), not skipped
        deadline = time.time() + 70
        while not any(end >= recovered_at for _, end, _ in list(queries)) and time.time() < deadline:
            time.sleep(0.5)
        during = [code for start, end, code in queries if start <= recovered_at and end >= killed_at]
        assert during and all(code == 200 for code in during), f"queries between node loss and recovery: {during}"

        # a replacement node joins, and the replica set grows onto it while answers keep coming
        cluster.add_node(NodeSpec("worker-3", cpus=1, resources={"editstream_replica": 2}))
        scaled = subprocess.run(
            [editstream, "scale", "--replicas", "3", "--redis-url", redis_server.url, "--namespace", ns],
            capture_output=True, text=True, env=env, timeout=400,
        )  # fmt: skip
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        wait(converged(3, len(facts)), "3 converged replicas after scaling", 120)
        (choice,) = client.post("/v1/completions", json={"prompt": facts[0].prompt, "max_tokens": 4}).json()["choices"]
        assert choice["editstream"]["fired"] == facts[0].edit_id and choice["editstream"]["version"] == len(facts)
        after = [code for _, end, code in queries if end >= killed_at]
        answered = sum(code == 200 for code in after)
        assert answered >= 5 and answered >= 0.9 * len(after), f"queries from the node loss on: {after}"
    finally:
        stop_queries.set()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
        cluster.stop()
        serve_log.close()
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.mark.redis
def test_scale_needs_a_running_serve_and_records_the_wanted_counts(redis_server):
    from services.cli.commands import scale

    store = RedisStore(connect(redis_server.url), "sc")
    assert scale(redis_server.url, "sc", {"replica": 3}, wait_s=0) == 2  # nobody would act on it
    assert store.desired() == {}
    store.mark_serving({"pid": 1})
    assert scale(redis_server.url, "sc", {"replica": 3, "editor": 2}, wait_s=0) == 0
    assert store.desired() == {"replica": 3, "editor": 2}
