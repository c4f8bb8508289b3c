"""`editstream cluster`: a local multi-node Ray cluster."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("editstream")


def _cluster_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.wiring.cluster import LocalCluster, load_spec

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalCluster(load_spec(args.file)) as cluster:
        env = " ".join(f"{k}={v}" for k, v in cluster.client_env.items())
        print(f"Ray cluster up at {cluster.address}: " + ", ".join(s.name for s in cluster.specs))
        print(f"join it with:\n  {env} editstream serve --address {cluster.address}")
        print("Ctrl-C stops every node", flush=True)
        stop.wait()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine (development, tests)")
    up = p.add_subparsers(dest="cluster_command", required=True).add_parser(
        "up", help="start the nodes of a cluster file, print its address and token, stop them on Ctrl-C"
    )
    up.add_argument("file", nargs="?", default="cluster/local.yaml", help="cluster file (default cluster/local.yaml)")
    up.set_defaults(func=_cluster_up)
