"""The Redis transport on a real redis-server: what `status` reports survives a restart."""

from __future__ import annotations

import pytest

from services.store import GroupReader, RedisStore, connect

pytestmark = pytest.mark.redis


def test_ingest_lag_is_counted_after_an_aof_reload_never_reported_as_zero(redis_server):
    store = RedisStore(connect(redis_server.url), "lagtest")
    reader = GroupReader(store.r, store.keys.facts, "ingest", "ingest-0", batch=2)
    for i in range(5):
        store.r.xadd(store.keys.facts, {"prompt": f"p{i}", "target": "t"})
    rows = reader.read()
    reader.ack([rows[0][0]])
    assert len(rows) == 2 and store.ingest_lag() == 3 + 1  # 3 never delivered + 1 delivered, not acked
    redis_server.stop()  # SIGTERM: the AOF is complete; on reload XINFO's entries-read and lag are nil
    redis_server.start()
    store = RedisStore(connect(redis_server.url), "lagtest")
    assert store.ingest_lag() == 3 + 1
