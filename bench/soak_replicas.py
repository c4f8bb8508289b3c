"""XADD -> applied latency per replica over a seq range of a soak's Arrow edit log (a diagnostic: the
soak's JSON has the worst of both replicas per tenth, this tells which replica holds it up).

    .venv/bin/python bench/soak_replicas.py RUN_DIR/run FIRST_SEQ LAST_SEQ
"""

from __future__ import annotations

import argparse

import numpy as np

from editstream.arrowlog import read_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the soak's run directory holding edits/ (--run-dir DIR: DIR/run)")
    parser.add_argument("first", type=int, help="seqs after this one")
    parser.add_argument("last", type=int, help="up to and including this one")
    args = parser.parse_args()
    table = read_log(args.run_dir, "edits").select(["seq", "replica", "latency_ms"]).to_pydict()
    seq, replica, ms = (np.array(table[k]) for k in ("seq", "replica", "latency_ms"))
    inside = (seq > args.first) & (seq <= args.last)
    for name in np.unique(replica):
        x = ms[inside & (replica == name)]
        print(
            f"{name}: {len(x)} entries, p50 {np.percentile(x, 50):.0f} ms, p99 {np.percentile(x, 99):.0f} ms, "
            f"max {x.max():.0f} ms, over 1 s {(x > 1000).mean():.4f}"
        )


if __name__ == "__main__":
    main()
