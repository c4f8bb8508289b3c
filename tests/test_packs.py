"""Edit state on disk: a state reads back in apply order; a newer state writes only what the older one
lacks and links its packs, copies the live part of a mostly dead pack, rewrites an edit id whose
content changed, and a damaged pack is refused with its place named. Given what writing the older
state returned, the newer one does not read the older index back, and a state that is not the older
one plus new edits falls back to matching by edit id."""

from __future__ import annotations

import shutil

import pytest
import torch

from editstream import packs
from editstream.artifacts import Artifact, PackedArtifact
from editstream.errors import ArtifactError
from editstream.packs import read_artifacts, read_index, write_state


def artifact(i: int, target: str = "t") -> Artifact:
    key = torch.full((8,), float(i), dtype=torch.float16)
    return Artifact("recipe", f"e{i}", "fp", {"key": key}, {"prompt": f"p{i}", "target": target})


def read(directory) -> list[Artifact]:
    return list(read_artifacts(directory, read_index(directory)))


def digests(artifacts) -> list[str]:
    return [a.content_digest() for a in artifacts]


def test_a_state_reads_back_in_apply_order(tmp_path):
    state = [artifact(i) for i in (3, 1, 2)]
    written = write_state(tmp_path / "a", "recipe", "fp", state)
    assert written.artifacts_written == 3 and written.linked == 0
    back = read(tmp_path / "a")
    assert [a.edit_id for a in back] == ["e3", "e1", "e2"] and digests(back) == digests(state)
    assert torch.equal(back[0].tensors["key"], state[0].tensors["key"])


def test_a_newer_state_writes_only_the_new_artifacts_and_links_the_older_pack(tmp_path):
    first = [artifact(i) for i in range(10)]
    write_state(tmp_path / "a", "recipe", "fp", first, "pack-a.bin")
    second = [*first[1:], artifact(10), artifact(11)]  # one retracted, two new
    written = write_state(tmp_path / "b", "recipe", "fp", second, "pack-b.bin", previous=tmp_path / "a")
    assert written.artifacts_written == 2 and written.linked == (tmp_path / "a" / "pack-a.bin").stat().st_size
    assert (tmp_path / "b" / "pack-a.bin").stat().st_ino == (tmp_path / "a" / "pack-a.bin").stat().st_ino
    shutil.rmtree(tmp_path / "a")  # each state stands alone
    assert digests(read(tmp_path / "b")) == digests(second)


def test_the_live_part_of_a_mostly_dead_pack_is_copied_not_linked(tmp_path):
    first = [artifact(i) for i in range(10)]
    write_state(tmp_path / "a", "recipe", "fp", first, "pack-a.bin")
    second = [first[4], artifact(10), first[7]]  # 2 of 10 still live
    written = write_state(tmp_path / "b", "recipe", "fp", second, "pack-b.bin", previous=tmp_path / "a")
    assert written.linked == 0 and written.artifacts_written == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["pack-b.bin", "state.json"]
    assert digests(read(tmp_path / "b")) == digests(second)


def test_an_edit_id_whose_content_changed_is_written_again(tmp_path):
    write_state(tmp_path / "a", "recipe", "fp", [artifact(1), artifact(2)], "pack-a.bin")
    resent = [artifact(1), artifact(2, target="other")]  # retracted, then sent again as another fact
    written = write_state(tmp_path / "b", "recipe", "fp", resent, "pack-b.bin", previous=tmp_path / "a")
    assert written.artifacts_written == 1
    assert [a.meta["target"] for a in read(tmp_path / "b")] == ["t", "other"]


def test_a_damaged_pack_or_another_method_is_refused(tmp_path):
    write_state(tmp_path / "a", "recipe", "fp", [artifact(1), artifact(2)], "pack-a.bin")
    with pytest.raises(ArtifactError, match="scen on fp"):
        write_state(tmp_path / "b", "scen", "fp", [artifact(3)], "pack-b.bin", previous=tmp_path / "a")
    pack = tmp_path / "a" / "pack-a.bin"
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last artifact's tensor bytes
    pack.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"pack-a\.bin: the \d+ bytes at \d+ are not artifact e2"):
        read(tmp_path / "a")


def test_a_snapshot_whose_predecessor_lost_a_pack_is_written_whole(tmp_path):
    from editstream.snapshot import Capture, snapshots, write_snapshot

    first = [artifact(i) for i in range(4)]
    write_snapshot(Capture(4, ("e3", 1.0), "recipe", "fp", tuple(first)), tmp_path)
    (tmp_path / "snap-000000000004" / "pack-000000000004.bin").unlink()  # the older snapshot is damaged
    path = write_snapshot(Capture(5, ("e4", 2.0), "recipe", "fp", (*first, artifact(4))), tmp_path)
    assert [s.seq for s in snapshots(tmp_path)] == [5, 4]
    assert digests(read(path)) == digests([*first, artifact(4)])


def test_a_format_1_snapshot_is_still_read_and_the_next_one_is_written_whole(tmp_path):
    """Snapshots written before incremental packs (one `artifacts.bin`, no digests in the index):
    a replica upgraded while Redis is compacted below one must still be able to start from it."""
    import json

    from editstream.snapshot import Capture, snapshots, write_snapshot

    old = [artifact(i) for i in range(3)]
    snap = tmp_path / "snap-000000000003"
    snap.mkdir()
    order, blobs = [], b""
    for a in old:
        order.append([a.edit_id, len(blobs), len(a.to_bytes())])
        blobs += a.to_bytes()
    (snap / "artifacts.bin").write_bytes(blobs)
    (snap / "state.json").write_text(json.dumps({"method": "recipe", "base_fingerprint": "fp", "order": order}))
    meta = {"format": 1, "method": "recipe", "base_fingerprint": "fp", "seq": 3, "entry": ["e2", 1.0], "digest": "d"}
    (snap / "snapshot.json").write_text(json.dumps(meta))
    (info,) = snapshots(tmp_path)
    assert digests(read(info.path)) == digests(old)
    path = write_snapshot(Capture(4, ("e3", 2.0), "recipe", "fp", (*old, artifact(3))), tmp_path)
    assert digests(read(path)) == digests([*old, artifact(3)])
    assert sorted(p.name for p in path.iterdir()) == ["pack-000000000004.bin", "snapshot.json", "state.json"]


@pytest.mark.parametrize("step", [None, 3])  # 3: every pass in several steps, as at a million edits
def test_a_state_written_after_one_it_placed_reads_no_index_back_and_writes_only_the_new(tmp_path, monkeypatch, step):
    if step:
        monkeypatch.setattr(packs, "STEP", step)
    first = [PackedArtifact(artifact(i)) for i in range(10)]
    placed = write_state(tmp_path / "a", "recipe", "fp", first, "pack-a.bin").placed
    (tmp_path / "a" / "state.json").unlink()  # matched by identity: the older index is not needed
    second = [*first[:3], *first[5:], PackedArtifact(artifact(10)), PackedArtifact(artifact(11))]
    written = write_state(tmp_path / "b", "recipe", "fp", second, "pack-b.bin", previous=placed)
    assert written.artifacts_written == 2 and written.linked == (tmp_path / "a" / "pack-a.bin").stat().st_size
    assert digests(read(tmp_path / "b")) == digests(second)
    third = [second[-1], *second[:-1]]  # not the older state plus new edits: matched by edit id and digest
    written = write_state(tmp_path / "c", "recipe", "fp", third, "pack-c.bin", previous=written.placed)
    assert written.artifacts_written == 0 and digests(read(tmp_path / "c")) == digests(third)
    shutil.rmtree(tmp_path / "b")
    assert digests(read(tmp_path / "c")) == digests(third)
    loaded = [PackedArtifact.from_bytes(a.to_bytes()) for a in third]  # the same edits, other objects
    written = write_state(tmp_path / "d", "recipe", "fp", loaded, "pack-d.bin", previous=written.placed)
    assert written.artifacts_written == 0 and digests(read(tmp_path / "d")) == digests(third)
