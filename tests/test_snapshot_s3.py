"""Snapshots in an S3-compatible bucket (a real S3 API over HTTP: moto's server, on a free loopback
port): upload and download are incremental and leave out unfinished snapshots, the bucket keeps the
newest two, and a replica whose store is the bucket starts from the writer's snapshot (also after
compaction), with the digest of the writer."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from editstream.demo_facts import demo_facts
from editstream.models import EMBEDDED_LLM
from editstream.snapshot import META, snapshots
from editstream.snapshot_s3 import S3Snapshots
from services.transport.redis_server import free_port
from services.transport.store import RedisStore, connect
from services.workers.editor import Editor
from services.workers.replica_host import ReplicaService
from tests.test_poison import drain, journal

boto3 = pytest.importorskip("boto3")  # noqa: F841 - both come with the test extra
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture
def bucket(monkeypatch):
    """A fresh bucket on an S3 server of its own; the environment points boto3 at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    name = f"snaps-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets per process, across servers
    boto3.client("s3").create_bucket(Bucket=name)
    yield name
    server.stop()


class Counting:
    """An S3 client that counts uploads and downloads (everything else passes through)."""

    def __init__(self) -> None:
        import boto3

        self.client, self.uploads, self.downloads = boto3.client("s3"), [], []

    def upload_file(self, path: str, bucket: str, key: str) -> None:
        self.uploads.append(key.rsplit("/", 1)[-1])
        self.client.upload_file(path, bucket, key)

    def download_file(self, bucket: str, key: str, path: str) -> None:
        self.downloads.append(key.rsplit("/", 1)[-1])
        self.client.download_file(bucket, key, path)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


def fake_snapshot(store: Path, seq: int, packs: dict[str, bytes]) -> Path:
    """A snapshot directory as far as the store goes: opaque pack files and a snapshot.json."""
    path = store / f"snap-{seq:012d}"
    path.mkdir(parents=True)
    for name, data in packs.items():
        (path / name).write_bytes(data)
    (path / "state.json").write_text(json.dumps({"seq": seq}))
    meta = {"format": 2, "method": "recipe", "base_fingerprint": "fp", "seq": seq, "entry": ["e", 1.0], "digest": "d"}
    (path / META).write_text(json.dumps(meta))
    return path


def test_push_and_pull_are_incremental_and_the_bucket_keeps_the_newest_two(bucket, tmp_path):
    client = Counting()
    remote = S3Snapshots(f"s3://{bucket}/ns", client=client)
    local = tmp_path / "writer"
    one = {"pack-000000000001.bin": b"a" * 1000}
    two = {**one, "pack-000000000002.bin": b"b" * 500}
    three = {**two, "pack-000000000003.bin": b"c" * 300}
    remote.push(fake_snapshot(local, 1, one))
    remote.push(fake_snapshot(local, 2, two))
    # the second snapshot's first pack was copied inside the bucket, not sent again
    assert client.uploads == ["pack-000000000001.bin", "state.json", META, "pack-000000000002.bin", "state.json", META]
    reader = tmp_path / "reader"
    assert [p.name for p in remote.pull(reader)] == ["snap-000000000002", "snap-000000000001"]
    assert (reader / "snap-000000000002" / "pack-000000000001.bin").read_bytes() == b"a" * 1000
    remote.push(fake_snapshot(local, 3, three))
    assert remote.finished() == ["snap-000000000003", "snap-000000000002"]  # the oldest is gone from the bucket
    client.downloads.clear()
    assert [p.name for p in remote.pull(reader)] == ["snap-000000000003"]
    # only the new pack came down; the two the reader had are hard links of its copies
    assert client.downloads == ["pack-000000000003.bin", "state.json", META]
    newest, older = reader / "snap-000000000003", reader / "snap-000000000002"
    assert (newest / "pack-000000000002.bin").stat().st_ino == (older / "pack-000000000002.bin").stat().st_ino
    assert [s.seq for s in snapshots(reader)] == [3, 2]
    assert remote.pull(reader) == []  # nothing new


def test_an_unfinished_upload_is_never_downloaded(bucket, tmp_path):
    remote = S3Snapshots(f"s3://{bucket}/ns")
    remote.push(fake_snapshot(tmp_path / "w", 1, {"pack-000000000001.bin": b"a"}))
    half = fake_snapshot(tmp_path / "w", 2, {"pack-000000000002.bin": b"b"})
    remote.s3.upload_file(str(half / "pack-000000000002.bin"), bucket, "ns/snap-000000000002/pack-000000000002.bin")
    assert remote.finished() == ["snap-000000000001"]
    assert [p.name for p in remote.pull(tmp_path / "r")] == ["snap-000000000001"]


def test_a_bad_store_address_is_named():
    with pytest.raises(ValueError, match="no bucket named"):
        S3Snapshots("s3:///prefix")
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        S3Snapshots("/a/directory")


@pytest.mark.redis
def test_a_replica_starts_from_the_bucket_after_compaction(bucket, redis_server, tmp_path):
    store = RedisStore(connect(redis_server.url), "s3")
    facts = demo_facts(6)
    editor = Editor(redis_server.url, "recipe", EMBEDDED_LLM, "s3")
    opts = {"snapshot_dir": f"s3://{bucket}/edits", "snapshot_every": 4}
    writer = ReplicaService(
        redis_server.url, "recipe", EMBEDDED_LLM, "replica-0", "s3", compact=True,
        snapshot_cache=str(tmp_path / "node-a"), **opts,
    )  # fmt: skip
    journal(store, facts[:4])
    drain(editor)
    drain(writer)
    assert S3Snapshots(f"s3://{bucket}/edits/s3").finished() == ["snap-000000000004"]
    assert store.compacted() == 4  # compacted only once the bucket held the snapshot
    journal(store, facts[4:])
    drain(editor)
    late = ReplicaService(
        redis_server.url, "recipe", EMBEDDED_LLM, "replica-1", "s3", snapshot_cache=str(tmp_path / "node-b"), **opts
    )
    drain(late)
    drain(writer)
    assert late.snapshot_seq == 4 and late.version == writer.version == 6
    assert late.replica.digest() == writer.replica.digest()
    assert [s.seq for s in snapshots(tmp_path / "node-b" / "s3" / "replica-1")] == [4]  # its own local copy
