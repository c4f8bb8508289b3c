"""The resource model: where each kind of actor runs on a Ray cluster.

* Replicas hold a model copy. On a cluster with GPUs each replica takes one GPU (`replica_gpus`,
  default 1; a fraction packs several on one GPU); on CPU-only clusters they take `replica_cpus`
  (default 0, so a 2-core laptop still fits two). Replicas are spread over nodes (SPREAD), so one
  lost node takes as few as possible with it.
* Editors, ingest and evaluators take `editor_cpus` / nothing by default, and are also spread.
* Slot resources: a node started with `--resources '{"editstream_replica": 2}'` (or
  `editstream_editor`, `editstream_control` for ingest and evaluators) is where that kind goes: once
  any node in the cluster advertises a kind's slot, every actor of that kind needs one unit of it.
  Operators dedicate nodes this way (GPU workers for replicas, a CPU pool for editors) without
  changing code; a cluster without slots places everything by CPU/GPU alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SLOTS = {
    "replica": "editstream_replica",
    "editor": "editstream_editor",
    "ingest": "editstream_control",
    "evaluator": "editstream_control",
}


@dataclass(frozen=True)
class Resources:
    """What one actor of each kind asks for; None for replica GPUs means 'one if the cluster has any'."""

    replica_cpus: float = 0.0
    replica_gpus: float | None = None
    editor_cpus: float = 0.0
    editor_gpus: float = 0.0


def actor_options(kind: str, res: Resources, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray actor options for one actor of `kind`, given `ray.cluster_resources()`."""
    if kind not in SLOTS:
        raise ValueError(f"unknown actor kind {kind!r}; expected one of {sorted(SLOTS)}")
    cpus, gpus = 0.0, 0.0
    if kind == "replica":
        cpus = res.replica_cpus
        gpus = res.replica_gpus if res.replica_gpus is not None else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
    elif kind == "editor":
        cpus, gpus = res.editor_cpus, res.editor_gpus
    slot = SLOTS[kind]
    resources = {slot: 1.0} if cluster.get(slot, 0) > 0 else {}
    return {"num_cpus": cpus, "num_gpus": gpus, "resources": resources, "scheduling_strategy": "SPREAD"}
