"""`editstream demo`: the streaming demo on the embedded defaults."""

from __future__ import annotations

import argparse
import json
import logging

from services.cli.common import method_args

log = logging.getLogger("editstream")


def _demo(args: argparse.Namespace) -> int:
    from services.wiring.demo import DemoOptions, print_summary, run_demo

    summary = run_demo(
        DemoOptions(
            facts=args.facts,
            replicas=args.replicas,
            rate=args.rate,
            run_dir=args.run_dir,
            method=args.method,
            model=args.model,
            redis_url=args.redis_url,
            checkpoint=args.checkpoint,
        )
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0 if summary["lost"] == 0 and summary["converged"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: stream demo facts into 2 replicas and show what changed",
        description="Starts Redis (if none is reachable), local Ray, 2 replicas, an editor and an "
        "evaluator; feeds the demo facts; prints before/after answers, throughput and latency.",
    )
    p.add_argument("--facts", type=int, default=200, help="how many demo facts to feed (default 200)")
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    p.add_argument("--rate", type=float, default=50.0, help="facts per second to feed (0: as fast as possible)")
    p.add_argument("--run-dir", default=None, help="where logs go (default runs/demo-<time>)")
    method_args(p)
    p.add_argument("--redis-url", default=None, help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--json", action="store_true", help="print one JSON summary to stdout")
    p.set_defaults(func=_demo)
