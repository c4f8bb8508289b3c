"""Typed clients of the service actors: named, checked arguments instead of `Host.call("ask", ...)`.

Each client wraps a Ray actor handle of `system.Host` and returns an `ObjectRef` (for `ray.get` or
`await`), so callers keep choosing between blocking, batching and async; what changes is that a
misspelt method or a misplaced argument fails where it is written, not inside the actor.
"""

from __future__ import annotations

from typing import Any

import ray

from editstream.generation import Sampling


class _Client:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _call(self, method: str, *args: Any) -> ray.ObjectRef:
        return self.handle.call.remote(method, *args)


class ReplicaClient(_Client):
    """A replica actor (`workers.replica_host.ReplicaService`)."""

    def ask(
        self,
        prompts: list[str],
        max_new_tokens: int = 12,
        min_version: int = 0,
        timeout_s: float = 30.0,
        chat: bool = False,
        until_cut: bool = False,
        edited: bool = True,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> ray.ObjectRef:
        """Answers (dicts of `replica.Answer` plus the replica's name); see `ReplicaService.ask`."""
        return self._call(
            "ask", prompts, max_new_tokens, min_version, timeout_s, chat, until_cut, edited, False, sampling, stop
        )

    def ask_stream(
        self,
        prompt: str,
        max_new_tokens: int = 16,
        min_version: int = 0,
        timeout_s: float = 30.0,
        chat: bool = False,
        history: list[dict[str, str]] | None = None,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> Any:
        """One answer as it is decoded (an `ObjectRefGenerator`); see `ReplicaService.ask_stream`."""
        args = (prompt, max_new_tokens, min_version, timeout_s, chat, history, sampling, stop)
        return self.handle.stream.remote("ask_stream", *args)

    def state(self) -> ray.ObjectRef:
        return self._call("state")

    def active(self, edit_ids: list[str]) -> ray.ObjectRef:
        return self._call("active", edit_ids)

    def nll(self, texts: list[str]) -> ray.ObjectRef:
        return self._call("nll", texts)


class EvaluatorClient(_Client):
    """An evaluator actor (`workers.evaluator.Evaluator`)."""

    def set_replicas(self, replicas: list) -> ray.ObjectRef:
        return self._call("set_replicas", replicas)

    def stats(self) -> ray.ObjectRef:
        return self._call("stats")


class StatsClient(_Client):
    """An ingest or editor actor: only their counters are asked from outside."""

    def stats(self) -> ray.ObjectRef:
        return self._call("stats")
