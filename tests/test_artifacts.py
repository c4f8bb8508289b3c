"""Artifacts round-trip as safetensors with JSON metadata, and refuse what is not one."""

import json
import struct

import pytest
import torch

from editstream.artifacts import Artifact, PackedArtifact, stacked
from editstream.errors import ArtifactError


def make() -> Artifact:
    return Artifact(
        "recipe", "e-1", "fp", {"key": torch.arange(4, dtype=torch.float16)}, {"prompt": "p", "target": "t"}
    )


def test_roundtrip_bytes_and_files(tmp_path):
    a = make()
    b = Artifact.from_bytes(a.to_bytes())
    assert (b.method, b.edit_id, b.base_fingerprint, b.meta) == (a.method, a.edit_id, a.base_fingerprint, a.meta)
    assert torch.equal(b.tensors["key"], a.tensors["key"])
    assert a.content_digest() == b.content_digest()
    c = Artifact.load(a.save(tmp_path))
    assert c.content_digest() == a.content_digest()
    assert (tmp_path / "e-1.json").is_file()


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\xff" * 16, b"\x02\x00\x00\x00\x00\x00\x00\x00{}"])
def test_garbage_is_rejected(data):
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(data)


def test_newer_schema_is_rejected():
    a = make()
    a.schema_version = 99
    with pytest.raises(ArtifactError, match="newer"):
        Artifact.from_bytes(a.to_bytes())


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"shape": [5]}, "does not fit"),  # more elements than the bytes hold
        ({"data_offsets": [0, 4096]}, "does not fit"),  # past the end of the buffer
        ({"dtype": "X9"}, "bad header entry"),
        ({"shape": "four"}, "bad header entry"),
    ],
)
def test_a_tensor_header_that_does_not_fit_its_bytes_is_rejected(change, says):
    data = make().to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["key"].update(change)
    head = json.dumps(header).encode()
    with pytest.raises(ArtifactError, match=says):
        Artifact.from_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])


def test_a_packed_artifact_unpacks_to_the_same_bytes_and_is_not_changed_through_a_copy():
    a = Artifact(
        "rledit",
        "e-2",
        "fp",
        {
            "u0": torch.randn(3, 5).half(),
            "a0": torch.randn(3, 7),
            "ids": torch.arange(4, dtype=torch.int32),
            "empty": torch.empty(0, 2),
        },
        {"prompt": "The sky is", "target": "green", "modules": ["m.a", "m.b"], "score": 0.125},
    )
    packed = PackedArtifact(a)
    assert packed.content_digest() == a.content_digest()
    b = packed.unpack()
    assert b.to_bytes() == a.to_bytes() and b.meta == a.meta and b.edit_id == "e-2"
    assert packed.get("target") == "green" and packed.get("missing", 7) == 7 and packed.method == "rledit"
    assert torch.equal(packed.tensor("a0"), a.tensors["a0"]) and packed.tensor("empty").shape == (0, 2)
    assert packed.has("u0") and not packed.has("prompt")
    b.tensors["a0"] += 1  # unpacked tensors are copies
    b.meta["target"] = "red"
    assert torch.equal(packed.unpack().tensors["a0"], a.tensors["a0"]) and packed.get("target") == "green"
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        packed.tensor("nope")


def test_stacked_reads_one_tensor_of_many_artifacts_from_their_bytes():
    packed = []
    for i in range(5):
        a = make()
        a.edit_id, a.tensors = f"e{i}", {**a.tensors, "key": torch.full((4,), float(i), dtype=torch.float16)}
        packed.append(PackedArtifact(a))
    keys = stacked(packed, "key")
    assert keys.dtype == torch.float16 and torch.equal(keys, torch.stack([p.tensor("key") for p in packed]))
    other = make()
    other.edit_id, other.tensors = "odd", {**other.tensors, "key": torch.zeros(3, dtype=torch.float16)}
    with pytest.raises(ArtifactError, match="differs in dtype or shape"):
        stacked([*packed, PackedArtifact(other)], "key")
    with pytest.raises(KeyError, match="no tensor 'nothing'"):
        stacked(packed, "nothing")


@pytest.mark.parametrize(
    "meta",
    [
        {"prompt": "The sky is", "target": "green"},
        {"prompt": 'quote " back \\ slash / tab \t nul \x00 del \x7f', "target": "Zürich \u200b\u202e \x1b[31m"},
        {"target": "東京", "nested": {"b": [1, 2.5, None, True], "a": "x"}, "score": 1e-7, "n": 2**40},
        {},
    ],
)
def test_a_packed_artifact_writes_the_bytes_safetensors_writes_without_making_tensors(meta, monkeypatch):
    tensors = {
        "u0": torch.randn(3, 5).half(),
        "a0": torch.randn(3, 7),
        "ids": torch.arange(4, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "bf": torch.randn(2).bfloat16(),
        "empty": torch.empty(0, 2),
        "scalar": torch.tensor(3.0),
    }
    a = Artifact("rledit", "e-\u00e9", "fp", tensors, meta)
    expected = a.to_bytes()  # safetensors' own serialisation
    packed = PackedArtifact.from_bytes(expected)
    monkeypatch.setattr(PackedArtifact, "unpack", lambda self: pytest.fail("took the slow path"))
    assert packed.to_bytes() == expected


def test_a_packed_artifact_whose_bytes_do_not_hash_to_its_digest_is_serialised_in_full(caplog):
    a = make()
    packed = PackedArtifact.from_bytes(a.to_bytes())
    packed._digest = bytes(32)  # as if the fast header differed from what was read
    assert packed.to_bytes() == a.to_bytes()
    assert "did not re-encode to its digest" in caplog.text
