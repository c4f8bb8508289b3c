"""Prometheus metrics through Ray's metrics export (`ray.util.metrics`).

Inside a Ray worker the metrics are real and appear in Ray's Prometheus endpoint; elsewhere (plain
unit tests) every call is a no-op, so the service classes work with or without Ray.
"""

from __future__ import annotations

from typing import Any

import ray

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]


class _Noop:
    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set(self, *args: Any, **kwargs: Any) -> None:
        pass

    def observe(self, *args: Any, **kwargs: Any) -> None:
        pass


class Metrics:
    """The pipeline's metrics, tagged by component name."""

    def __init__(self, component: str) -> None:
        self.tags = {"component": component}
        if not ray.is_initialized():
            self.applied = self.accepted = self.dead_lettered = _Noop()
            self.version = self.lag = self.retention = self.locality = _Noop()
            self.latency = _Noop()
            return
        from ray.util import metrics as m

        keys = ("component",)
        self.applied = m.Counter("editstream_applied_edits", "journal entries applied by a replica", tag_keys=keys)
        self.accepted = m.Counter("editstream_accepted_facts", "facts journaled by ingest", tag_keys=keys)
        self.dead_lettered = m.Counter("editstream_dead_lettered", "events sent to the DLQ", tag_keys=keys)
        self.version = m.Gauge("editstream_replica_version", "last applied seq", tag_keys=keys)
        self.lag = m.Gauge("editstream_ingest_lag", "journal entries not yet applied by this replica", tag_keys=keys)
        self.retention = m.Gauge("editstream_retention", "recent reliability of earlier edits", tag_keys=keys)
        self.locality = m.Gauge("editstream_locality", "recent agreement on unrelated prompts", tag_keys=keys)
        self.latency = m.Histogram(
            "editstream_edit_latency_ms",
            "XADD -> applied on this replica (ms)",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=keys,
        )
        for metric in (
            self.applied,
            self.accepted,
            self.dead_lettered,
            self.version,
            self.lag,
            self.retention,
            self.locality,
            self.latency,
        ):
            metric.set_default_tags(self.tags)
