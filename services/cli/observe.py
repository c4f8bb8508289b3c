"""`editstream monitor` and `editstream report`: watching a run and plotting it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("editstream")


def _monitor(args: argparse.Namespace) -> int:
    from editstream.monitoring import AlarmThresholds
    from services.cli.monitor import monitor
    from services.transport.redis_server import reachable
    from services.transport.store import RedisStore, connect

    url = args.redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    store = RedisStore(connect(url), args.namespace) if args.namespace and reachable(url) else None
    thresholds = AlarmThresholds(retention=args.retention_alarm, locality=args.locality_alarm)
    return monitor(store, Path(args.run_dir), args.interval, args.once, thresholds)


def _report(args: argparse.Namespace) -> int:
    from editstream.report import write_report

    print(write_report(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="live dashboard: edits/s, lag, DLQ, versions, retention, locality, alarms")
    p.add_argument("run_dir", help="the run directory holding eval/ and edits/ Arrow logs")
    p.add_argument("--namespace", default=None, help="Redis key prefix of the running system (for live state)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print once and exit (status 1 if an alarm fires)")
    p.add_argument("--retention-alarm", type=float, default=0.7, help="alarm below this retention of old edits")
    p.add_argument("--locality-alarm", type=float, default=0.9, help="alarm below this locality")
    p.set_defaults(func=_monitor)
    p = sub.add_parser("report", help="PNG plots (forgetting, locality, throughput) and an HTML summary of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.set_defaults(func=_report)
