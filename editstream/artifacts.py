"""Edit artifacts: self-describing JSON metadata + safetensors, the only form an edit travels in.

An artifact is what `compute` returns and `apply` consumes. Its bytes are a plain safetensors
buffer whose header metadata carries the method, edit id, schema version and base-model
fingerprint, so it can cross processes and machines (Redis, disk) with no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
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
        return st_save(tensors, metadata={_META_KEY: json.dumps(self.header(), sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Artifact:
        header = _read_header(data)
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"artifact tensors are unreadable: {exc}") from exc
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
            tensors=dict(tensors),
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


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ArtifactError(f"artifact is {len(data)} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ArtifactError(f"artifact header claims {n} bytes but only {len(data) - 8} follow")
    try:
        raw = json.loads(data[8 : 8 + n])
        return json.loads(raw["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact has no editstream metadata: {exc}") from exc
