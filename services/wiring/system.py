"""The running system on Ray: ingest, editors, replicas and evaluators, started and supervised.

Every actor is the same thin shell (`Host`): it builds one service object from `services/` and runs
its `step` loop in a thread, while other threads answer calls (`call`). Actors restart on crash
(`max_restarts=-1`); a restarted ingest/editor re-reads its pending entries and a restarted
replica replays the journal, so a kill -9 loses nothing. `supervise()` replaces actors that are
gone for good, and replicas can be added or removed while the stream runs.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from editstream.errors import ConfigError
from editstream.methods import method_class
from services.transport.store import RedisStore, connect
from services.wiring.clients import EvaluatorClient, ReplicaClient, StatsClient
from services.wiring.placement import Resources, actor_options
from services.workers.loop import Loop

log = logging.getLogger(__name__)

SERVICES = {
    "ingest": "services.workers.ingest:Ingestor",
    "editor": "services.workers.editor:Editor",
    "replica": "services.workers.replica_host:ReplicaService",
    "evaluator": "services.workers.evaluator:Evaluator",
}


class Host:
    """Ray actor body: one service object plus its background step loop."""

    def __init__(self, kind: str, kwargs: dict[str, Any], idle_s: float = 0.0) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        module, cls = SERVICES[kind].split(":")
        self.obj = getattr(importlib.import_module(module), cls)(**kwargs)
        # What the service loaded (a model, a tokenizer, the libraries: millions of long-lived
        # objects) is frozen out of the garbage collector, so a full collection no longer walks it:
        # once the edits' small objects triggered one, it paused a replica's apply loop ~300 ms.
        gc.collect()
        gc.freeze()
        self.loop = Loop(f"{kind}:{kwargs.get('name', kwargs.get('consumer', kind))}", self.obj.step, idle_s).start()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """A generator method of the service, streamed (the caller gets an `ObjectRefGenerator`)."""
        yield from getattr(self.obj, method)(*args, **kwargs)

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Liveness: answered on its own thread, never behind queries or the step loop."""
        return True

    @ray.method(concurrency_group="health")
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
    resources: Resources = field(default_factory=Resources)
    method_options: dict[str, Any] = field(default_factory=dict)
    edit_scope: str = "answer"  # how far a fired RECIPE/text-RAG/SCEN edit shapes an answer
    snapshot_dir: str | None = None  # replica snapshots (a directory every node reads); None: none
    snapshot_every: int = 1000  # journal entries between snapshots (replica-0 writes them)
    compact: bool = False  # after each snapshot, remove the journal, artifacts and dead records below it


class System:
    """Starts and keeps the actor set; the driver-side handle of a running pipeline."""

    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        self.actors: dict[str, Any] = {}
        self._starting: dict[str, float] = {}  # name -> when it was spawned, until it first answers a ping
        self._next: dict[str, int] = {}
        self.store = RedisStore(connect(config.redis_url), config.namespace)

    def _spawn(self, name: str, kind: str, kwargs: dict[str, Any]) -> Any:
        options = actor_options(kind, self.config.resources, ray.cluster_resources())
        actor = (
            ray.remote(concurrency_groups={"health": 1})(Host)
            .options(
                name=f"{self.config.namespace}:{name}",
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=4,
                # idle OpenMP threads sleep instead of spinning: actors share cores with each other
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
                **options,
            )
            .remote(kind, kwargs)
        )
        self.actors[name] = (kind, kwargs, actor)
        self._starting[name] = time.time()  # until its first answer: it may be loading a model
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
        self.store.set_desired({"replica": c.replicas, "editor": c.editors, "evaluator": c.evaluators})
        self._spawn("ingest", "ingest", {**self._common(), "consumer": "ingest-0"})
        for _ in range(c.editors):
            self.add("editor", wait=False)
        for _ in range(c.replicas):
            self.add("replica", wait=False)
        for _ in range(c.evaluators):
            self.add("evaluator", wait=False)
        ray.get([a.ping.remote() for *_, a in self.actors.values()])
        return self

    # --- the actor set -----------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return [n for n, (k, *_) in self.actors.items() if k == kind]

    def handle(self, name: str) -> Any:
        return self.actors[name][2]

    def replica_names(self) -> list[str]:
        return self.names("replica")

    def replica_handles(self) -> list[Any]:
        return [self.handle(n) for n in self.replica_names()]

    def _kwargs(self, kind: str, name: str) -> dict[str, Any]:
        c = self.config
        model = {"method": c.method, "model": c.model, "method_options": c.method_options}
        if kind == "editor":
            threads = c.editor_threads or max(1, (os.cpu_count() or 2) // max(1, c.editors))
            return {**self._common(), **model, "consumer": name, "threads": threads}
        if kind == "replica":
            snaps = {"snapshot_dir": c.snapshot_dir, "snapshot_every": c.snapshot_every, "compact": c.compact}
            return {**self._common(), **model, "name": name, "run_dir": c.run_dir, "edit_scope": c.edit_scope, **snaps}
        if kind == "evaluator":
            seed = int(name.rsplit("-", 1)[1])
            return {
                **self._common(),
                "run_dir": c.run_dir,
                "method": c.method,
                "replicas": self.replica_handles(),
                "budget": c.eval_budget,
                "name": name,
                "seed": seed,
            }
        raise ValueError(f"cannot add actors of kind {kind!r}")

    def add(self, kind: str, wait: bool = True) -> str:
        """Start one more editor, replica or evaluator (a new replica replays the journal first)."""
        self._next[kind] = self._next.get(kind, 0) + 1
        name = f"{kind}-{self._next[kind] - 1}"
        actor = self._spawn(name, kind, self._kwargs(kind, name))
        if wait:
            ray.get(actor.ping.remote())
        if kind == "replica":
            self._update_evaluators()
        return name

    def remove(self, kind: str, name: str | None = None) -> str:
        """Stop the newest actor of `kind` (or `name`); an editor's unacked work is claimed by the others."""
        name = name or self.names(kind)[-1]
        *_, actor = self.actors.pop(name)
        self._starting.pop(name, None)
        if kind == "replica":
            self._update_evaluators()
            self.store.forget_replica(name)
        try:
            ray.get(actor.stop.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            log.warning("%s did not stop cleanly", name)
        ray.kill(actor)
        return name

    def scale(self, kind: str, count: int) -> list[str]:
        """Add or remove actors of `kind` until there are `count`; returns the names changed."""
        if kind not in ("replica", "editor", "evaluator"):
            raise ConfigError(f"can scale replicas, editors or evaluators, not {kind!r}")
        minimum = 1 if kind in ("replica", "editor") else 0
        if count < minimum:
            raise ConfigError(f"{kind}s: {count} is below the minimum of {minimum}")
        if kind == "editor" and count != 1 and method_class(self.config.method).sequential:
            raise ConfigError(f"method {self.config.method!r} needs exactly one editor, not {count}")
        changed = []
        while len(self.names(kind)) < count:
            changed.append(self.add(kind))
        while len(self.names(kind)) > count:
            changed.append(self.remove(kind))
        if changed:
            log.info("scaled %ss to %d: %s", kind, count, ", ".join(changed))
        return changed

    def reconcile(self) -> list[str]:
        """Apply the desired counts that `editstream scale` wrote to Redis."""
        changed = []
        for kind, count in self.store.desired().items():
            if count != len(self.names(kind)):
                try:
                    changed += self.scale(kind, count)
                except ConfigError as e:
                    log.error("ignoring desired %s count: %s", kind, e)
                    self.store.set_desired({kind: len(self.names(kind))})
        return changed

    def _update_evaluators(self) -> None:
        handles = self.replica_handles()
        for name in self.names("evaluator"):
            EvaluatorClient(self.handle(name)).set_replicas(handles)

    # --- health and state ----------------------------------------------------------------------
    def supervise(self, timeout_s: float = 5.0, name_wait_s: float = 30.0, start_grace_s: float = 600.0) -> list[str]:
        """Recreate actors that no longer answer; returns their names. An actor that has not answered
        since it was spawned and is younger than `start_grace_s` is still starting (a replica loads its
        model and replays the journal in its constructor, which can take minutes on a busy machine): a
        ping timeout does not count against it, only its death does (replacing it then would start
        the load over, forever). One that cannot be started yet (the dead one's name not released, no
        node with room) is tried again at the next call."""
        replaced = []
        for name, (kind, kwargs, actor) in list(self.actors.items()):
            try:
                ray.get(actor.ping.remote(), timeout=timeout_s)
                self._starting.pop(name, None)
                continue
            except ray.exceptions.GetTimeoutError:
                spawned = self._starting.get(name)
                if spawned is not None and time.time() - spawned < start_grace_s:
                    continue  # still in its constructor
                log.warning("actor %s does not answer; starting a new one", name)
            except ray.exceptions.RayActorError:
                log.warning("actor %s is gone; starting a new one", name)
            ray.kill(actor, no_restart=True)
            try:
                self._wait_name_released(name, name_wait_s)
                self._spawn(name, kind, kwargs)
            except (TimeoutError, ValueError) as exc:  # ValueError: Ray's "name already taken"
                log.warning("cannot start %s again yet (%s); trying at the next check", name, exc)
                continue
            replaced.append(name)
        if any(self.actors[n][0] == "replica" for n in replaced):
            self._update_evaluators()
        return replaced

    def _wait_name_released(self, name: str, timeout_s: float) -> None:
        """Wait until Ray has released the killed actor's name (a kill on a lost node takes a while)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                ray.get_actor(f"{self.config.namespace}:{name}")
            except ValueError:
                return
            time.sleep(0.2)
        raise TimeoutError(f"Ray still holds the name {self.config.namespace}:{name} {timeout_s:.0f} s after the kill")

    def replica_states(self) -> list[dict]:
        return ray.get([ReplicaClient(h).state() for h in self.replica_handles()])

    def wait_for_version(self, version: int, timeout_s: float = 300.0) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if all(s["version"] >= version for s in self.replica_states()):
                return True
            time.sleep(0.05)
        return False

    def wait_for_evaluation(self, rounds: int = 1, timeout_s: float = 60.0, min_version: int = 0) -> bool:
        """Wait until every evaluator finished `rounds` probe rounds, one of them at replica version
        `min_version` or later (so it could sample every edit up to there)."""
        names = self.names("evaluator")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            stats = ray.get([EvaluatorClient(self.handle(n)).stats() for n in names])
            if all(s["rounds"] >= rounds and s["version"] >= min_version for s in stats):
                return True
            time.sleep(0.2)
        return False

    def ask(
        self,
        prompts: list[str],
        replica: int = 0,
        min_version: int = 0,
        max_new_tokens: int = 12,
        chat: bool = False,
        until_cut: bool = False,
    ) -> list[dict]:
        handle = self.replica_handles()[replica]
        return ray.get(ReplicaClient(handle).ask(prompts, max_new_tokens, min_version, chat=chat, until_cut=until_cut))

    def stats(self, name: str) -> dict:
        """The counters of the ingest, editor or evaluator actor `name`."""
        return ray.get(StatsClient(self.handle(name)).stats())

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop every actor's loop (flushing its logs), then kill it; one on a lost node is not waited for."""
        refs = {name: actor.stop.remote() for name, (*_, actor) in self.actors.items()}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for name, ref in refs.items():
            try:
                if ref not in done:
                    raise TimeoutError(f"no answer in {timeout_s:.0f} s")
                ray.get(ref)
            except (ray.exceptions.RayActorError, TimeoutError) as exc:
                log.warning("%s did not stop cleanly: %s", name, exc)
        for *_, actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
