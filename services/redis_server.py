"""A private redis-server on a free loopback port: for the demo when none is reachable, and for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from editstream.errors import EditstreamError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """`redis-server` bound to 127.0.0.1 with AOF on, in its own directory; restartable on the same port."""

    def __init__(self, port: int | None = None, directory: Path | None = None, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise EditstreamError("redis-server is not installed; install it with: apt-get install redis-server")
        self.port = port or free_port()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="editstream-redis-"))
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if reachable(self.url):
                return self
            time.sleep(0.05)
        raise EditstreamError(f"redis-server did not start on port {self.port}; see {self.dir / 'redis.log'}")

    def kill(self) -> None:
        """Stop at once (SIGKILL): what AOF has written survives."""
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
