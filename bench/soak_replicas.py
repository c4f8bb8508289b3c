"""XADD -> applied latency per replica over a seq range of a soak's Arrow edit log (a diagnostic: the
soak's JSON has the worst of both replicas per tenth, this tells which replica holds it up, and with
`--window N` in which N-seq windows).

    .venv/bin/python bench/soak_replicas.py RUN_DIR/run FIRST_SEQ LAST_SEQ [--window 10000]
"""

from __future__ import annotations

import argparse

import numpy as np

from editstream.arrowlog import read_log


def summary(x: np.ndarray) -> str:
    """Count, p50, p99, max and the share over 1 s of latencies `x` (ms)."""
    if not len(x):
        return "no entries"
    return (
        f"{len(x)} entries, p50 {np.percentile(x, 50):.0f} ms, p99 {np.percentile(x, 99):.0f} ms, "
        f"max {x.max():.0f} ms, over 1 s {(x > 1000).mean():.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the soak's run directory holding edits/ (--run-dir DIR: DIR/run)")
    parser.add_argument("first", type=int, help="seqs after this one")
    parser.add_argument("last", type=int, help="up to and including this one")
    parser.add_argument(
        "--window", type=int, default=0, help="also one line per replica for each window of this many seqs"
    )
    args = parser.parse_args()
    if args.window < 0 or args.last < args.first:
        parser.error(f"--window {args.window} must be >= 0 and LAST {args.last} >= FIRST {args.first}")
    table = read_log(args.run_dir, "edits").select(["seq", "replica", "latency_ms"]).to_pydict()
    seq, replica, ms = (np.array(table[k]) for k in ("seq", "replica", "latency_ms"))
    inside = (seq > args.first) & (seq <= args.last)
    for name in np.unique(replica):
        print(f"{name}: {summary(ms[inside & (replica == name)])}")
    for start in range(args.first, args.last, args.window) if args.window else ():
        window = inside & (seq > start) & (seq <= start + args.window)
        for name in np.unique(replica):
            x = ms[window & (replica == name)]
            print(f"  seqs {start + 1}-{start + args.window} {name}: {summary(x)}")


if __name__ == "__main__":
    main()
