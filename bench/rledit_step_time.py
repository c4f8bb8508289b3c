"""Time RLEdit training trajectories with the layers below the edited band cached and without.

    .venv/bin/python bench/rledit_step_time.py [--trajectories 2] [--out bench/results/rledit-train-step.json]

Runs the same trajectories (same sampled batches, same starting hypernetworks, no optimiser step)
on the embedded model and the train splits `editstream train rledit` uses, once with
`cache_below` on and once off, and writes seconds per edit step and the losses of both (they must
agree: the cache only skips layers whose output cannot have changed). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

from editstream.bench.provenance import provenance
from editstream.data import load_edits
from editstream.methods.rledit.config import RLEditConfig, TrainConfig
from editstream.methods.rledit.train import RLEditTrainer
from editstream.models import load_causal_lm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectories", type=int, default=2, help="trajectories timed per setting")
    p.add_argument("--trajectory-batches", type=int, default=4)
    p.add_argument("--backtrack", type=int, default=2)
    p.add_argument("--out", default="bench/results/rledit-train-step.json")
    args = p.parse_args()
    lm = load_causal_lm()
    edits = [e for name in ("counterfact-train", "zsre-train") for e in load_edits(name)]
    schedule = TrainConfig(trajectory=args.trajectory_batches, backtrack=args.backtrack, validation_edits=0)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RLEditTrainer(lm, edits, Path(tmp), RLEditConfig(), schedule)
        start = {k: v.clone() for k, v in trainer.nets.state_dict().items()}
        trainer.reader.read(edits[: schedule.batch])  # the first forwards are slow: not timed
        for cached in (True, False):
            trainer.schedule = dataclasses.replace(schedule, cache_below=cached)
            trainer.nets.load_state_dict(start)
            rng = random.Random(0)
            began = time.perf_counter()
            losses = [trainer.trajectory(rng, learn=False) for _ in range(args.trajectories)]
            seconds = time.perf_counter() - began
            steps = args.trajectories * args.trajectory_batches
            result["cached" if cached else "plain"] = {
                "seconds_per_step": round(seconds / steps, 2),
                "losses": losses,
                "hits_misses_last_trajectory": list(trainer.cache_counts) if cached else None,
            }
    report = {
        **provenance(),
        "model": lm.name,
        "edit_batch": schedule.batch,
        "trajectory_batches": args.trajectory_batches,
        "backtrack": args.backtrack,
        **result,
        "speedup": round(result["plain"]["seconds_per_step"] / result["cached"]["seconds_per_step"], 2),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    steps = [report[k]["seconds_per_step"] for k in ("cached", "plain")]
    print(json.dumps({"speedup": report["speedup"], "seconds_per_step_cached_plain": steps}))


if __name__ == "__main__":
    main()
