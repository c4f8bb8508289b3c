"""Edit and query cost of RECIPE (and SCEN), measured side by side in one run.

* edit throughput: `compute` over a batch of edits vs the sentence encoder alone on the same texts;
* query latency: one prompt, greedy generation of `new_tokens` tokens, for the unedited model,
  RECIPE and text-RAG with `stored` edits each (and RECIPE at a larger count); the caller picks the
  probes: paraphrases of stored edits make every query search the key index (the path timed first),
  stored prompts take the exact-prompt fast path (reported beside);
* memory: serialized artifact bytes and resident memory added per stored edit.
Where more edits are needed than were computed, the extra ones copy real artifacts with a random
routing key (a flat index's or a neuron bank's cost does not depend on the values; a random key never
fires, so a probe still fires its own real edit). SCEN: seconds per edit, artifact bytes, and
latency with `stored` experts in the bank vs the unedited model.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from editstream.artifacts import Artifact
from editstream.edits import EditRequest
from editstream.methods.base import EditMethod
from editstream.replica import Replica

log = logging.getLogger(__name__)


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process `pid` (this one by default), in bytes."""
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def edit_throughput(method: EditMethod, edits: Sequence[EditRequest], repeats: int = 3) -> dict[str, float]:
    """Edits/s of `compute` vs sentences/s of the encoder alone, best of `repeats`, same texts."""
    encoder = method.retrieval.encoder  # type: ignore[attr-defined]
    prompts = [e.prompt for e in edits]
    enc = min(timed(lambda: encoder.encode(prompts), repeats))
    comp = min(timed(lambda: method.compute(edits), repeats))
    return {
        "n": len(edits),
        "encoder_per_s": round(len(edits) / enc, 1),
        "edits_per_s": round(len(edits) / comp, 1),
        "ratio": round(enc / comp, 3),
    }


def fill(method: EditMethod, artifacts: list[Artifact], total: int, key: str = "key") -> None:
    """Apply `artifacts`, then synthetic ones up to `total` stored edits: copies of real artifacts
    whose routing tensor `key` has random directions of the same norms, row by row (so it never matches
    a probe); called again with a larger `total`, it adds the difference."""
    for a in artifacts[:total]:
        method.apply(a)
    gen = torch.Generator().manual_seed(0)
    stored = len(method.edit_ids())  # a second fill adds to the first
    for i in range(stored, total):
        base = artifacts[i % len(artifacts)]
        real = base.tensors[key].float()
        direction = torch.nn.functional.normalize(torch.randn(real.shape, generator=gen), dim=-1)
        tensors = {**base.tensors, key: (direction * real.norm(dim=-1, keepdim=True)).to(base.tensors[key].dtype)}
        meta = {**base.meta, "prompt": f"synthetic filler {i}"}
        method.apply(Artifact(base.method, f"filler-{i}", base.base_fingerprint, tensors, meta))


def edit_seconds(method: EditMethod, edits: Sequence[EditRequest]) -> tuple[list[Artifact], dict[str, float]]:
    """Artifacts for `edits` computed one by one, with the seconds each took."""
    artifacts, times = [], []
    for edit in edits:
        t = time.perf_counter()
        artifacts += method.compute([edit])
        times.append(time.perf_counter() - t)
    stats = {
        "n": len(edits),
        "median_s": round(statistics.median(times), 3),
        "mean_s": round(statistics.fmean(times), 3),
    }
    return artifacts, stats


def query_latency(replicas: dict[str, Replica], prompts: Sequence[str], new_tokens: int, rounds: int) -> dict:
    """Median seconds per single-prompt generation, interleaving the setups round by round."""
    times: dict[str, list[float]] = {k: [] for k in replicas}
    fired: dict[str, int] = dict.fromkeys(replicas, 0)
    for rep in replicas.values():  # warm-up
        rep.generate([prompts[0]], new_tokens)
    for _ in range(rounds):
        for p in prompts:
            for name, rep in replicas.items():
                t = time.perf_counter()
                (ans,) = rep.generate([p], new_tokens)
                times[name].append(time.perf_counter() - t)
                fired[name] += ans.fired is not None
    n = rounds * len(prompts)
    return {
        k: {
            "median_ms": round(1000 * statistics.median(v), 2),
            "p90_ms": round(1000 * sorted(v)[int(0.9 * len(v))], 2),
            "fired_share": round(fired[k] / n, 3),
        }
        for k, v in times.items()
    }


def memory_per_edit(method: EditMethod, artifacts: list[Artifact]) -> dict[str, float]:
    """Resident memory added per edit when replica-style applies decode artifacts from bytes."""
    method.reset()
    blobs = [a.to_bytes() for a in artifacts]
    gc.collect()
    before = rss_bytes()
    for blob in blobs:
        method.apply(Artifact.from_bytes(blob))
    gc.collect()
    grown = rss_bytes() - before
    return {
        "n": len(artifacts),
        "rss_bytes_per_edit": round(grown / len(artifacts), 1),
        "artifact_bytes_mean": round(statistics.fmean(a.nbytes for a in artifacts[:200]), 1),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in artifacts[0].tensors.values()),
    }
