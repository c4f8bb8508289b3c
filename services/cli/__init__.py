"""The `editstream` command line: train, bench, and the streaming system's commands.

Each subcommand's `--help` explains it. Library work (train, bench) imports neither Ray nor
Redis; the system commands import them when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from services.cli import bench, cluster, demo, observe, system, train

log = logging.getLogger("editstream")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editstream",
        description="Streaming knowledge editing for LLMs: facts from Redis become live edits on Ray replicas.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    system.add_parser(sub)
    cluster.add_parser(sub)
    observe.add_parser(sub)
    return parser


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures end in one line that names the cause and the fix (exit 2)."""
    import redis

    from editstream.errors import EditstreamError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = _redacted(getattr(args, "redis_url", None) or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        return int(args.func(args) or 0)
    except redis.AuthenticationError as exc:
        print(
            f"editstream: Redis at {url} refused the credentials ({exc}); fix the password in --redis-url "
            "or $REDIS_URL (redis://:PASSWORD@host:port/db)",
            file=sys.stderr,
        )
    except redis.ConnectionError as exc:
        print(
            f"editstream: cannot reach Redis at {url} ({exc}); start redis-server there or point --redis-url "
            "or $REDIS_URL at a running one",
            file=sys.stderr,
        )
    except redis.ResponseError as exc:
        if "NOAUTH" not in str(exc) and "WRONGPASS" not in str(exc):
            raise
        print(
            f"editstream: Redis at {url} needs a password ({exc}); give it in --redis-url or $REDIS_URL "
            "(redis://:PASSWORD@host:port/db)",
            file=sys.stderr,
        )
    except EditstreamError as exc:
        print(f"editstream: {exc}", file=sys.stderr)
    return 2
