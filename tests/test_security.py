"""Redis with a password works through the URL; nothing from the stream is unpickled."""

import pytest

from services.transport.redis_server import RedisServer
from services.transport.store import RedisStore, connect
from services.workers.ingest import Ingestor

pytestmark = pytest.mark.redis


def test_password_url_is_required_and_works(tmp_path):
    server = RedisServer(directory=tmp_path / "r", password="s3cret-pass").start()
    try:
        with pytest.raises(Exception, match="(?i)auth"):
            connect(server.url.replace(":s3cret-pass@", "")).ping()
        ingest = Ingestor(server.url, namespace="sec")
        store = RedisStore(connect(server.url), "sec")
        store.r.xadd(store.keys.facts, {"prompt": "The sky is", "target": "green"})
        # a pickled payload is just bytes in a field: it is refused as an unknown field, never loaded
        store.r.xadd(store.keys.facts, {"payload": b"\x80\x04\x95\x00"})
        while ingest.step():
            pass
        assert store.last_seq() == 1 and store.dlq_size() == 1
    finally:
        server.stop()


def test_tls_url_works_and_plain_connections_are_refused(tmp_path):
    server = RedisServer(directory=tmp_path / "r", password="s3cret-pass", tls=True).start()
    try:
        assert server.url.startswith("rediss://")
        with pytest.raises(Exception):  # noqa: B017 - a plain client on the TLS port is cut off
            connect(server.url.split("?")[0].replace("rediss://", "redis://")).ping()
        ingest = Ingestor(server.url, namespace="tls")
        store = RedisStore(connect(server.url), "tls")
        store.r.xadd(store.keys.facts, {"prompt": "The sky is", "target": "green"})
        while ingest.step():
            pass
        assert store.last_seq() == 1 and store.dlq_size() == 0
    finally:
        server.stop()
