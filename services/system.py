"""The running system on Ray: ingest, editors, replicas and evaluators, started and supervised.

Every actor is the same thin shell (`Host`): it builds one service object from `services/` and runs
its `step` loop in a thread, while other threads answer calls (`call`). Actors restart on crash
(`max_restarts=-1`); a restarted ingest/editor re-reads its pending entries and a restarted
replica replays the journal, so a kill -9 loses nothing. `supervise()` replaces actors that are
gone for good, and replicas can be added or removed while the stream runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from editstream.errors import ConfigError
from editstream.methods import method_class
from services.loop import Loop

log = logging.getLogger(__name__)

SERVICES = {
    "ingest": "services.ingest:Ingestor",
    "editor": "services.editor:Editor",
    "replica": "services.replica:ReplicaService",
    "evaluator": "services.evaluator:Evaluator",
}


class Host:
    """Ray actor body: one service object plus its background step loop."""

    def __init__(self, kind: str, kwargs: dict[str, Any], idle_s: float = 0.0) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        module, cls = SERVICES[kind].split(":")
        self.obj = getattr(importlib.import_module(module), cls)(**kwargs)
        self.loop = Loop(f"{kind}:{kwargs.get('name', kwargs.get('consumer', kind))}", self.obj.step, idle_s).start()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.loop.stop()
        if hasattr(self.obj, "flush"):
            self.obj.flush()


@dataclass
class SystemConfig:
    redis_url: str
    run_dir: str
    method: str = "recipe"
    model: str = "smollm2-135m"
    namespace: str = "editstream"
    replicas: int = 2
    editors: int = 1
    evaluators: int = 1
    eval_budget: float = 0.1
    editor_threads: int = 0  # torch threads per editor; 0: this node's cores shared among the editors
    replica_gpus: float = 0.0
    method_options: dict[str, Any] = field(default_factory=dict)


class System:
    """Starts and keeps the actor set; the driver-side handle of a running pipeline."""

    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        self.actors: dict[str, Any] = {}
        self._next_replica = 0

    def _spawn(self, name: str, kind: str, kwargs: dict[str, Any], num_gpus: float = 0.0) -> Any:
        actor = (
            ray.remote(Host)
            .options(
                name=f"{self.config.namespace}:{name}",
                num_cpus=0,
                num_gpus=num_gpus,
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=4,
                # idle OpenMP threads sleep instead of spinning: actors share cores with each other
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
            )
            .remote(kind, kwargs)
        )
        self.actors[name] = (kind, kwargs, num_gpus, actor)
        return actor

    def _common(self) -> dict[str, Any]:
        return {"redis_url": self.config.redis_url, "namespace": self.config.namespace}

    def start(self) -> System:
        c = self.config
        if method_class(c.method).sequential and c.editors != 1:
            raise ConfigError(
                f"method {c.method!r} computes each edit on top of the earlier ones: it needs exactly "
                f"one editor, not {c.editors}"
            )
        Path(c.run_dir).mkdir(parents=True, exist_ok=True)
        info = {
            "method": c.method,
            "model": c.model,
            "namespace": c.namespace,
            "replicas": c.replicas,
            "started": time.time(),
        }
        (Path(c.run_dir) / "run.json").write_text(json.dumps(info, indent=2))
        self._spawn("ingest", "ingest", {**self._common(), "consumer": "ingest-0"})
        for i in range(c.editors):
            self._spawn(
                f"editor-{i}",
                "editor",
                {
                    **self._common(),
                    "method": c.method,
                    "model": c.model,
                    "consumer": f"editor-{i}",
                    "method_options": c.method_options,
                    "threads": c.editor_threads or max(1, (os.cpu_count() or 2) // c.editors),
                },
            )
        for _ in range(c.replicas):
            self.add_replica(wait=False)
        for i in range(c.evaluators):
            self._spawn(
                f"evaluator-{i}",
                "evaluator",
                {
                    **self._common(),
                    "run_dir": c.run_dir,
                    "method": c.method,
                    "replicas": self.replica_handles(),
                    "budget": c.eval_budget,
                    "name": f"evaluator-{i}",
                    "seed": i,
                },
            )
        ray.get([a.ping.remote() for *_, a in self.actors.values()])
        return self

    # --- replicas ----------------------------------------------------------------------------------
    def replica_names(self) -> list[str]:
        return [n for n, (kind, *_) in self.actors.items() if kind == "replica"]

    def replica_handles(self) -> list[Any]:
        return [self.actors[n][3] for n in self.replica_names()]

    def add_replica(self, wait: bool = True) -> str:
        c = self.config
        name = f"replica-{self._next_replica}"
        self._next_replica += 1
        actor = self._spawn(
            name,
            "replica",
            {
                **self._common(),
                "method": c.method,
                "model": c.model,
                "name": name,
                "method_options": c.method_options,
                "run_dir": c.run_dir,
            },
            num_gpus=c.replica_gpus,
        )
        if wait:
            ray.get(actor.ping.remote())
        self._update_evaluators()
        return name

    def remove_replica(self, name: str | None = None) -> str:
        name = name or self.replica_names()[-1]
        *_, actor = self.actors.pop(name)
        self._update_evaluators()
        ray.kill(actor)
        return name

    def _update_evaluators(self) -> None:
        handles = self.replica_handles()
        for kind, *_, actor in self.actors.values():
            if kind == "evaluator":
                actor.call.remote("set_replicas", handles)

    # --- health and state ----------------------------------------------------------------------
    def supervise(self, timeout_s: float = 5.0) -> list[str]:
        """Recreate actors that no longer answer; returns their names."""
        replaced = []
        for name, (kind, kwargs, gpus, actor) in list(self.actors.items()):
            try:
                ray.get(actor.ping.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("actor %s is gone; starting a new one", name)
                ray.kill(actor, no_restart=True)
                self._spawn(name, kind, kwargs, gpus)
                replaced.append(name)
        if any(self.actors[n][0] == "replica" for n in replaced):
            self._update_evaluators()
        return replaced

    def replica_states(self) -> list[dict]:
        return ray.get([h.call.remote("state") for h in self.replica_handles()])

    def wait_for_version(self, version: int, timeout_s: float = 300.0) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if all(s["version"] >= version for s in self.replica_states()):
                return True
            time.sleep(0.05)
        return False

    def wait_for_evaluation(self, rounds: int = 1, timeout_s: float = 60.0) -> bool:
        """Wait until every evaluator finished `rounds` probe rounds."""
        names = [n for n, (kind, *_) in self.actors.items() if kind == "evaluator"]
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if all(self.call(n, "stats")["rounds"] >= rounds for n in names):
                return True
            time.sleep(0.2)
        return False

    def ask(self, prompts: list[str], replica: int = 0, min_version: int = 0, max_new_tokens: int = 12) -> list[dict]:
        handle = self.replica_handles()[replica]
        return ray.get(handle.call.remote("ask", prompts, max_new_tokens, min_version))

    def call(self, name: str, method: str, *args: Any) -> Any:
        return ray.get(self.actors[name][3].call.remote(method, *args))

    def stop(self) -> None:
        ray.get([a.stop.remote() for *_, a in self.actors.values()])
        for *_, actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
