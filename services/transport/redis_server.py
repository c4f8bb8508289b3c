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

    def __init__(
        self, port: int | None = None, directory: Path | None = None, password: str | None = None, tls: bool = False
    ) -> None:
        """tls=True: TLS only (no plain port), with a certificate authority made for this server;
        `url` is then rediss:// and names that CA's file, so clients verify the server."""
        if shutil.which("redis-server") is None:
            raise EditstreamError("redis-server is not installed; install it with: apt-get install redis-server")
        self.port = port or free_port()
        # absolute: redis-server changes into --dir before it opens --logfile, so a relative path would miss
        self.dir = Path(directory).resolve() if directory else Path(tempfile.mkdtemp(prefix="editstream-redis-"))
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir / 'ca.crt'}&ssl_cert_reqs=required"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _make_certificates(self) -> list[str]:
        """A throwaway CA and a server certificate for 127.0.0.1 (openssl); the redis-server TLS flags."""
        d = self.dir

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        ca, key, crt = str(d / "ca.crt"), str(d / "server.key"), str(d / "server.crt")
        if not (d / "server.crt").is_file():
            new_key = ["-newkey", "rsa:2048", "-nodes"]
            openssl(
                "req",
                "-x509",
                *new_key,
                "-days",
                "2",
                "-subj",
                "/CN=editstream-ca",
                "-keyout",
                str(d / "ca.key"),
                "-out",
                ca,
            )
            openssl("req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", str(d / "server.csr"))
            (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
            sign = ["-CA", ca, "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-extfile", str(d / "san.ext")]
            openssl("x509", "-req", "-in", str(d / "server.csr"), *sign, "-days", "2", "-out", crt)
        files = ["--tls-cert-file", crt, "--tls-key-file", key, "--tls-ca-cert-file", ca]
        return ["--port", "0", "--tls-port", str(self.port), *files, "--tls-auth-clients", "no"]

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
        if self.tls:
            args = [a for a in args if a not in ("--port", str(self.port))] + self._make_certificates()
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
