"""The longest single add into the scaling key index while it grows past its IVF retraining points.

Adds `--keys` random unit keys (float16-exact, `--dim` wide) one at a time, as a replica's apply loop
does, into `ScalingKeyIndex(threshold=--threshold)`, once with the training on the caller's thread and
once in the background, and reports per run the slowest add, the p99.9 add and when each IVF index
came into use. JSON on stdout (or `--out`).

    .venv/bin/python bench/index_stall.py --keys 450000 --out bench/results/scale/index-stall.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from editstream.bench.provenance import provenance
from editstream.retrieval import IvfKeyIndex, ScalingKeyIndex


def run(keys: torch.Tensor, threshold: int, background: bool) -> dict:
    index = ScalingKeyIndex(keys.shape[1], threshold, background=background)
    took = np.empty(len(keys))
    switches = []
    trained_on = None
    for i, key in enumerate(keys):
        started = time.perf_counter()
        index.add(f"e{i}", key)
        took[i] = time.perf_counter() - started
        inner = index.inner
        if isinstance(inner, IvfKeyIndex) and inner.trained_on != trained_on:
            trained_on = inner.trained_on
            switches.append({"at_key": i + 1, "trained_on": trained_on})
    index.wait()
    return {
        "background": background,
        "max_add_ms": round(float(took.max()) * 1e3, 2),
        "p999_add_ms": round(float(np.quantile(took, 0.999)) * 1e3, 3),
        "median_add_us": round(float(np.median(took)) * 1e6, 1),
        "adds_over_100ms": int((took > 0.1).sum()),
        "ivf_in_use": switches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=450_000, help="keys added one by one (default 450,000)")
    parser.add_argument("--threshold", type=int, default=100_000, help="flat -> IVF at this many (default 100,000)")
    parser.add_argument("--dim", type=int, default=128, help="key width (RECIPE's retriever: 128)")
    parser.add_argument("--out", help="write the JSON here as well")
    args = parser.parse_args()
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(args.keys, args.dim), dim=1).half().float()
    doc = {
        **provenance(),
        "runs": [run(keys, args.threshold, background) for background in (False, True)],
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
