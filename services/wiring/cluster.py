"""A local multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start`.

For development and tests: every node is a real raylet with its own resources (CPUs, GPUs, and the
`editstream_*` slot resources of `services/wiring/placement.py`), started with `ray start --block` in a
process of its own, so one node can be lost on purpose (`stop_node`: SIGKILL to its raylet and
everything under it, as when a machine dies) while the others run on. Ray's token authentication
is on with a fresh token per cluster; a driver joins with `client_env` in its environment.
The cluster is described by a YAML file (`cluster/local.yaml`):

    nodes:
      - {name: head, cpus: 1, resources: {editstream_control: 4}}
      - {name: worker-1, cpus: 1, resources: {editstream_replica: 2}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from editstream.errors import ConfigError
from services.transport.redis_server import free_port

log = logging.getLogger(__name__)

# Fast failure detection for a development cluster: a lost node is declared dead in ~3 s, not ~30 s.
DEV_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class NodeSpec:
    name: str
    cpus: float = 1
    gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)
    object_store_mb: int = 200


def load_spec(path: str | Path) -> list[NodeSpec]:
    """Nodes of a local cluster file; the first one is the head."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError(f"{path}: expected a non-empty list under 'nodes', got {nodes!r}")
    specs = []
    for i, n in enumerate(nodes):
        unknown = set(n) - {"name", "cpus", "gpus", "resources", "object_store_mb"}
        if unknown or "name" not in n:
            raise ConfigError(
                f"{path}: node {i} needs a name; fields: name, cpus, gpus, resources, object_store_mb; got {n}"
            )
        specs.append(NodeSpec(**n))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: node names must be unique, got {names}")
    return specs


class LocalCluster:
    """Start, inspect and take apart a multi-node Ray cluster on this machine."""

    def __init__(self, nodes: list[NodeSpec], temp_dir: str | None = None, env: dict[str, str] | None = None) -> None:
        if not nodes:
            raise ConfigError("a cluster needs at least a head node")
        self.specs = list(nodes)
        # Ray token authentication on, with a token of this cluster's own: drivers need `client_env`
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**os.environ, **DEV_ENV, **self.client_env, **(env or {})}
        # Ray's socket paths must stay short: a short directory under /tmp, not pytest's long tmp_path
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="esray-", dir="/tmp")
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # nodes lost on purpose
        self.ray = str(Path(sys.executable).with_name("ray"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> LocalCluster:
        head, *workers = self.specs
        try:
            self._start_node(head, head=True)
            self._wait_nodes(1, timeout_s)
            for i, spec in enumerate(workers, start=2):  # one at a time: nodes on one machine race for ports
                self._start_node(spec)
                self._wait_nodes(i, timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("local Ray cluster at %s: %s", self.address, ", ".join(s.name for s in self.specs))
        return self

    def add_node(self, spec: NodeSpec, timeout_s: float = 120) -> None:
        self.specs.append(spec)
        self._start_node(spec)
        self._wait_nodes(len(self.procs) - len(self.stopped), timeout_s)

    def _start_node(self, spec: NodeSpec, head: bool = False) -> None:
        args = [
            self.ray,
            "start",
            "--block",
            f"--num-cpus={spec.cpus}",
            f"--num-gpus={spec.gpus}",
            f"--resources={json.dumps(self.resources(spec), sort_keys=True)}",
            f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]
        if head:
            args += ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        logfile = open(self._log(spec.name), "ab")  # noqa: SIM115 (lives with the node)
        self.procs[spec.name] = subprocess.Popen(
            args, stdout=logfile, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    @staticmethod
    def resources(spec: NodeSpec) -> dict[str, float]:
        """The node's resources plus a marker `esnode_<name>` (to find or pin to a node by name)."""
        return {**spec.resources, f"esnode_{spec.name}": 1.0}

    def _wait_nodes(self, count: int, timeout_s: float) -> None:
        """Wait until `count` of our nodes logged that their Ray runtime started."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            started = 0
            for name, proc in self.procs.items():
                if name in self.stopped:
                    continue
                text = self._log(name).read_text(errors="replace")
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited with {proc.returncode}: {text[-2000:]}")
                started += "Ray runtime started" in text
            if started >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {count} Ray nodes came up in {timeout_s:.0f} s; logs in {self.temp_dir}")

    def _log(self, name: str) -> Path:
        return Path(self.temp_dir) / f"node-{name}.log"

    def stop_node(self, name: str) -> None:
        """Lose a node at once: SIGKILL its raylet, workers and agents (the GCS declares it dead)."""
        proc = self.procs[name]
        self.stopped.add(name)
        _kill_tree(proc.pid)
        proc.wait(timeout=30)
        log.warning("killed ray node %s", name)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            _kill_tree(self.procs[name].pid)
        for proc in self.procs.values():
            proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def node_name() -> str:
    """The calling actor's node: its `esnode_<name>` marker on a local cluster, else host/node-id."""
    import ray

    if not ray.is_initialized():
        return ""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            marks = [k[len("esnode_") :] for k in node["Resources"] if k.startswith("esnode_")]
            return marks[0] if marks else f"{node.get('NodeManagerHostname', '?')}/{node_id[:8]}"
    return node_id[:8]
