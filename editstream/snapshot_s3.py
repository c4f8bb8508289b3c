"""Snapshots in an S3-compatible bucket: a snapshot store at `s3://bucket/prefix` instead of a shared directory.

Replicas still write and read snapshots as directories on their own disk (`editstream.snapshot`);
with a bucket as the store, the writer uploads each snapshot once it is written, and a starting
replica downloads the newest ones it lacks before it chooses one. In the bucket a snapshot is
`<prefix>/snap-<seq>/<file>`, the same files as on disk; its `snapshot.json` goes up last, so a
snapshot without it is unfinished and never downloaded. Incremental both ways: a pack file the
previous snapshot already holds under the same name and size (packs never change once written) is
copied inside the bucket rather than uploaded again, and hard-linked from the local copy of the
previous snapshot rather than downloaded again. A wrong reuse cannot go unnoticed: loading checks
every artifact against its digest. The newest `keep` snapshots are kept in the bucket, as on disk.

Endpoint and credentials come from boto3's usual sources (`AWS_ENDPOINT_URL` for MinIO, Ceph and the
like, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `~/.aws`); boto3 is an optional dependency:
`pip install 'editstream[s3]'`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from editstream.errors import MissingPackageError
from editstream.packs import link_or_copy
from editstream.snapshot import KEEP, META, snapshots

log = logging.getLogger(__name__)

SCHEME = "s3://"


def is_s3(location: str | None) -> bool:
    return bool(location) and location.startswith(SCHEME)


class S3Snapshots:
    """The snapshots under one `s3://bucket/prefix`."""

    def __init__(self, url: str, client: Any | None = None) -> None:
        if not is_s3(url):
            raise ValueError(f"snapshot store {url!r}: expected s3://bucket/prefix")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"snapshot store {url!r}: no bucket named (expected s3://bucket/prefix)")
        self.url, self.bucket, self.prefix = url, bucket, prefix.strip("/")
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise MissingPackageError(
                    f"snapshot store {url}: S3 needs boto3; install it with: pip install 'editstream[s3]'"
                ) from exc
            client = boto3.client("s3")
        self.s3 = client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def listing(self) -> dict[str, dict[str, int]]:
        """Every snapshot directory in the bucket, finished or not: name -> {file name: size}."""
        found: dict[str, dict[str, int]] = {}
        start = self._key("") + "/" if self.prefix else ""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                name, _, file = obj["Key"][len(start) :].partition("/")
                if name.startswith("snap-") and file and "/" not in file:
                    found.setdefault(name, {})[file] = int(obj["Size"])
        return found

    def finished(self) -> list[str]:
        """Names of the finished snapshots in the bucket, newest first."""
        return _finished(self.listing())

    def push(self, snapshot: Path, keep: int = KEEP) -> None:
        """Upload the snapshot directory `snapshot` (its packs copied in the bucket where the previous
        uploaded snapshot holds them), then drop all but the newest `keep` in the bucket."""
        listing = self.listing()
        name = snapshot.name
        if META in listing.get(name, {}):
            return
        previous = next((n for n in _finished(listing) if n < name), None)
        sent = copied = 0
        for path in sorted(snapshot.iterdir()):
            if path.name == META:
                continue
            size = path.stat().st_size
            key = self._key(name, path.name)
            if previous and path.name.startswith("pack-") and listing[previous].get(path.name) == size:
                self.s3.copy({"Bucket": self.bucket, "Key": self._key(previous, path.name)}, self.bucket, key)
                copied += size
            else:
                self.s3.upload_file(str(path), self.bucket, key)
                sent += size
        self.s3.upload_file(str(snapshot / META), self.bucket, self._key(name, META))  # last: now it is finished
        log.info(
            "snapshot %s uploaded to %s: %.1f MB sent, %.1f MB copied in the bucket",
            name,
            self.url,
            sent / 1e6,
            copied / 1e6,
        )
        self._drop(self.listing(), keep)

    def _drop(self, listing: dict[str, dict[str, int]], keep: int) -> None:
        """Delete all but the newest `keep` finished snapshots, and unfinished ones older than those."""
        done = _finished(listing)
        oldest_kept = done[keep - 1] if len(done) >= keep else ""
        for name, files in listing.items():
            if name in done[:keep] or name > oldest_kept:
                continue  # kept, or an upload that may still be going on
            keys = [self._key(name, f) for f in sorted(files, key=lambda f: f == META, reverse=True)]
            for i in range(0, len(keys), 1000):  # snapshot.json first: a half-deleted snapshot is unfinished
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def pull(self, store: Path, keep: int = KEEP) -> list[Path]:
        """Download into the local directory `store` the newest `keep` finished snapshots it lacks
        (packs its newest local snapshot holds are hard-linked, not downloaded); returns those fetched."""
        store.mkdir(parents=True, exist_ok=True)
        listing = self.listing()
        fetched = []
        for name in _finished(listing)[:keep]:
            final = store / name
            if (final / META).exists():
                continue
            local = snapshots(store)
            previous = local[0].path if local else None
            tmp = store / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            got = linked = 0
            for file, size in sorted(listing[name].items(), key=lambda item: item[0] == META):  # META last
                have = previous / file if previous else None
                if file.startswith("pack-") and have is not None and have.is_file() and have.stat().st_size == size:
                    link_or_copy(have, tmp / file)
                    linked += size
                else:
                    self.s3.download_file(self.bucket, self._key(name, file), str(tmp / file))
                    got += size
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fetched.append(final)
            log.info(
                "snapshot %s downloaded from %s: %.1f MB fetched, %.1f MB linked",
                name,
                self.url,
                got / 1e6,
                linked / 1e6,
            )
        for old in snapshots(store)[keep:]:
            shutil.rmtree(old.path, ignore_errors=True)
        return fetched


def _finished(listing: dict[str, dict[str, int]]) -> list[str]:
    """The snapshots of a `listing` whose snapshot.json is there (uploaded last), newest first."""
    return sorted((n for n, files in listing.items() if META in files), reverse=True)
