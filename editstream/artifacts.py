"""Edit artifacts: self-describing JSON metadata + safetensors, the only form an edit travels in.

An artifact is what `compute` returns and `apply` consumes. Its bytes are a plain safetensors
buffer whose header metadata carries the method, edit id, schema version and base-model
fingerprint, so it can cross processes and machines (Redis, disk) with no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from editstream.errors import ArtifactError

SCHEMA_VERSION = 1
_META_KEY = "editstream"


@dataclass
class Artifact:
    """One computed edit: tensors plus JSON-able metadata; never holds a model reference."""

    method: str
    edit_id: str
    base_fingerprint: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # sha256 of the artifact's bytes, once known (`from_bytes` keeps the digest of what it read)
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def header(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "edit_id": self.edit_id,
            "base_fingerprint": self.base_fingerprint,
            "schema_version": self.schema_version,
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        data = st_save(tensors, metadata={_META_KEY: json.dumps(self.header(), sort_keys=True)})
        if self._digest is None:  # the bytes are at hand: the digest costs a hash, not another serialisation
            self._digest = hashlib.sha256(data).hexdigest()
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Artifact:
        header, tensors = _read(data)
        missing = {"method", "edit_id", "base_fingerprint", "schema_version"} - header.keys()
        if missing:
            raise ArtifactError(f"artifact header lacks {sorted(missing)}")
        if header["schema_version"] > SCHEMA_VERSION:
            raise ArtifactError(
                f"artifact schema {header['schema_version']} is newer than this editstream's {SCHEMA_VERSION}"
            )
        artifact = cls(
            method=header["method"],
            edit_id=header["edit_id"],
            base_fingerprint=header["base_fingerprint"],
            tensors=tensors,
            meta=header.get("meta", {}),
            schema_version=header["schema_version"],
        )
        artifact._digest = hashlib.sha256(data).hexdigest()
        return artifact

    def save(self, directory: Path) -> Path:
        """Write `<edit_id>.json` (metadata, for people) and `<edit_id>.safetensors` (the artifact)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{self.edit_id}.json").write_text(json.dumps(self.header(), indent=2))
        path = directory / f"{self.edit_id}.safetensors"
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: Path) -> Artifact:
        return cls.from_bytes(path.read_bytes())

    def content_digest(self) -> str:
        """sha256 of the artifact's bytes (`to_bytes` is deterministic, and reading bytes back and
        writing them again gives the same bytes), so an artifact and its copy read from Redis or a
        snapshot have the same digest; computed once. Artifacts are not changed after they are made."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._digest

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The editstream header and the tensors of a safetensors buffer. Parsed here rather than by
    `safetensors.torch.load` (a replica reads every artifact, and a snapshot a million of them): the
    header is parsed once and the tensors share one copy of the data section; every tensor's dtype,
    shape and offsets are checked against the buffer."""
    if len(data) < 8:
        raise ArtifactError(f"artifact is {len(data)} bytes: too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        raise ArtifactError(f"artifact header claims {n} bytes but only {len(data) - 8} follow")
    try:
        raw = json.loads(data[8 : 8 + n])
        header = json.loads(raw.pop("__metadata__")[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"artifact has no editstream metadata: {exc!r}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"artifact metadata is a {type(header).__name__}, not an object")
    body = bytearray(memoryview(data)[8 + n :])
    tensors = {}
    for name, spec in raw.items():
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = [int(d) for d in spec["shape"]]
            start, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact tensor {name!r} has a bad header entry {spec!r}: {exc!r}") from exc
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
            raise ArtifactError(
                f"artifact tensor {name!r}: {spec['dtype']} {shape} does not fit bytes {start}-{end} of {len(body)}"
            )
        flat = torch.frombuffer(body, dtype=dtype, count=count, offset=start) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return header, tensors
