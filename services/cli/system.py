"""The running system's commands: serve, feed, ask, retract, rollback, scale, status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from services.cli.common import edit_scope_arg, method_args, option_arg, parse_options

log = logging.getLogger("editstream")


def _system(args: argparse.Namespace) -> int:
    from services.cli import commands
    from services.transport.store import RedisStore, connect
    from services.wiring.demo import DEFAULT_REDIS_URL

    url = args.redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if args.command == "serve":
        if args.snapshot_every < 1:
            print(f"--snapshot-every {args.snapshot_every}: give a number of journal entries >= 1", file=sys.stderr)
            return 2
        if args.compact and not args.snapshot_dir:
            print("--compact needs --snapshot-dir: after compaction only snapshots hold old edits", file=sys.stderr)
            return 2
        if args.snapshot_dir.startswith("s3://"):
            from editstream.errors import MissingPackageError
            from editstream.snapshot_s3 import S3Snapshots

            try:
                S3Snapshots(args.snapshot_dir)
            except (ValueError, MissingPackageError) as exc:
                print(f"--snapshot-dir: {exc}", file=sys.stderr)
                return 2
        from editstream.methods import method_class

        if args.compact and method_class(args.method).sequential:
            print(
                f"--compact: {args.method} is sequential, and its editors rebuild their model from the whole "
                "journal; compaction is for recipe, text-rag and scen",
                file=sys.stderr,
            )
            return 2
        from services.wiring.demo import method_options
        from services.wiring.placement import Resources
        from services.wiring.system import SystemConfig

        config = SystemConfig(
            redis_url=url,
            run_dir=args.run_dir,
            method=args.method,
            model=args.model,
            namespace=args.namespace,
            replicas=args.replicas,
            editors=args.editors,
            evaluators=args.evaluators,
            method_options=method_options(args.method, args.checkpoint, parse_options(args.option)),
            edit_scope=args.edit_scope,
            snapshot_dir=args.snapshot_dir or None,
            snapshot_every=args.snapshot_every,
            compact=args.compact,
            resources=Resources(args.replica_cpus, args.replica_gpus, args.editor_cpus, args.editor_gpus),
        )
        token = os.environ.get("EDITSTREAM_HTTP_TOKEN") or None
        write_token = os.environ.get("EDITSTREAM_HTTP_WRITE_TOKEN") or None
        http = commands.HttpOptions(args.http_host, args.http_port, token, write_token) if args.http else None
        return commands.serve(config, args.address, http)
    if args.command == "scale":
        counts = {"replica": args.replicas, "editor": args.editors, "evaluator": args.evaluators}
        counts = {k: v for k, v in counts.items() if v is not None}
        if not counts:
            print("give at least one of --replicas, --editors, --evaluators", file=sys.stderr)
            return 2
        return commands.scale(url, args.namespace, counts, args.wait)
    if args.command == "feed":
        return commands.feed_file(url, args.namespace, args.source, args.rate, args.limit)
    if args.command == "rollback":
        return commands.rollback(url, args.namespace, args.to_version, args.wait)
    if args.command == "retract":
        return commands.retract(url, args.namespace, args.edit_id)
    if args.command == "ask":
        return commands.ask(
            args.namespace, args.prompt, args.replica, args.min_version, args.max_new_tokens, args.address
        )
    s = commands.status(RedisStore(connect(url), args.namespace))
    print(json.dumps(s, indent=2) if args.json else commands.status_line(s))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--redis-url",
            default=None,
            help="Redis URL, redis:// or rediss:// (TLS), password "
            "allowed (default $REDIS_URL or redis://127.0.0.1:6379/0)",
        )
        p.add_argument("--namespace", default="editstream", help="key prefix in Redis and Ray (default editstream)")
        p.set_defaults(func=_system)

    p = sub.add_parser("serve", help="run the pipeline (local Ray, or a cluster via --address / RAY_ADDRESS)")
    common(p)
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    method_args(p)
    option_arg(p)
    edit_scope_arg(p)
    p.add_argument("--run-dir", default="runs/serve", help="where the Arrow logs go")
    p.add_argument(
        "--snapshot-dir",
        default="",
        help="replica snapshots: a directory every node can read, or s3://bucket/prefix for an S3-compatible "
        "bucket (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; needs boto3). A starting "
        "replica loads the newest one and replays only the journal after it (default: none; every replica "
        "replays from seq 0)",
    )
    p.add_argument(
        "--snapshot-every", type=int, default=1000, help="journal entries between snapshots (replica-0 writes them)"
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="after each snapshot, remove from Redis the journal entries, artifacts and dead-letter records "
        "below it (below every live replica too); a replica that starts later needs the snapshot store",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    p.add_argument("--editors", type=int, default=1, help="editor workers (default 1)")
    p.add_argument("--evaluators", type=int, default=1, help="evaluators (default 1; 0 for none)")
    p.add_argument("--replica-cpus", type=float, default=0.0, help="CPUs each replica reserves (default 0)")
    p.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)"
    )
    p.add_argument("--editor-cpus", type=float, default=0.0, help="CPUs each editor reserves (default 0)")
    p.add_argument("--editor-gpus", type=float, default=0.0, help="GPUs per editor (default 0)")
    p.add_argument(
        "--http",
        action="store_true",
        help="serve HTTP (Ray Serve): OpenAI /v1/completions, POST /facts, GET /status; "
        "bearer token from $EDITSTREAM_HTTP_TOKEN (required beyond 127.0.0.1), a separate one for POST /facts "
        "from $EDITSTREAM_HTTP_WRITE_TOKEN",
    )
    p.add_argument("--http-host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p = sub.add_parser("scale", help="change the number of replicas/editors/evaluators of a running `serve`")
    common(p)
    p.add_argument("--replicas", type=int, default=None, help="wanted replicas (new ones replay the journal first)")
    p.add_argument("--editors", type=int, default=None, help="wanted editor workers")
    p.add_argument("--evaluators", type=int, default=None, help="wanted evaluators")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the replicas to be ready (0: return)")
    p = sub.add_parser("feed", help="send facts from a file (JSON, JSONL, benchmark file) or '-' (stdin JSONL)")
    common(p)
    p.add_argument("source", help="file path, dataset alias (counterfact, zsre), or - for JSON lines on stdin")
    p.add_argument("--rate", type=float, default=50.0, help="facts per second (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="send only the first N")
    p = sub.add_parser("ask", help="ask a replica: the answer, the edit that fired, the replica's version")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--replica", default="replica-0", help="which replica (default replica-0)")
    p.add_argument("--min-version", type=int, default=0, help="wait until the replica applied this seq")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or auto)")
    p = sub.add_parser("rollback", help="remove every edit after version K on every replica (retracts, newest first)")
    common(p)
    p.add_argument("--to-version", type=int, required=True, help="the journal seq to return to (0: no edits)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait until replicas applied it (0: return)")
    p = sub.add_parser("retract", help="queue the removal of an edit by its edit_id")
    common(p)
    p.add_argument("edit_id")
    p = sub.add_parser("status", help="journal length, ingest lag, DLQ size, edits/s, replica versions")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
