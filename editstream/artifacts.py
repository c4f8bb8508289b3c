"""Edit artifacts: self-describing JSON metadata + safetensors, the only form an edit travels in.

An artifact is what `compute` returns and `apply` consumes. Its bytes are a plain safetensors
buffer whose header metadata carries the method, edit id, schema version and base-model
fingerprint, so it can cross processes and machines (Redis, disk) with no pickle anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch
from safetensors.torch import save as st_save

from editstream.errors import ArtifactError

SCHEMA_VERSION = 1
_META_KEY = "editstream"
log = logging.getLogger(__name__)


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
    # the bytes it was read from (`from_bytes`), so packing it needs no second serialisation
    _raw: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value (as `PackedArtifact.get`)."""
        return self.meta.get(key, default)

    def header(self) -> dict[str, Any]:
        return _header(self.method, self.edit_id, self.base_fingerprint, self.schema_version, self.meta)

    def to_bytes(self) -> bytes:
        if self._raw is not None:  # read from these bytes, and artifacts are not changed after they are made
            return self._raw
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        data = st_save(tensors, metadata={_META_KEY: json.dumps(self.header(), sort_keys=True)})
        if self._digest is None:  # the bytes are at hand: the digest costs a hash, not another serialisation
            self._digest = hashlib.sha256(data).hexdigest()
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Artifact:
        header, tensors = _read(data)
        artifact = cls(
            method=header["method"],
            edit_id=header["edit_id"],
            base_fingerprint=header["base_fingerprint"],
            tensors=tensors,
            meta=header.get("meta", {}),
            schema_version=header["schema_version"],
        )
        artifact._digest = hashlib.sha256(data).hexdigest()
        artifact._raw = bytes(data)
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


def _header(method: str, edit_id: str, fingerprint: str, schema: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The editstream metadata of an artifact (the JSON its bytes carry, keys sorted when written)."""
    return {
        "method": method,
        "edit_id": edit_id,
        "base_fingerprint": fingerprint,
        "schema_version": schema,
        "meta": meta,
    }


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


def _parse(data: bytes) -> tuple[dict[str, Any], tuple, int]:
    """The editstream header (checked), the tensor layout ((name, safetensors dtype, shape, start,
    end) per tensor, in data order, each checked against the buffer) and where the data section
    starts, of a safetensors buffer. Parsed here rather than by `safetensors.torch.load` (a replica
    reads every artifact, and a snapshot a million of them)."""
    if len(data) < 8:
        raise ArtifactError(f"artifact is {len(data)} bytes: too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        raise ArtifactError(f"artifact header claims {n} bytes but only {len(data) - 8} follow")
    try:
        raw = _loads(data[8 : 8 + n])
        header = _loads(raw.pop("__metadata__")[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"artifact has no editstream metadata: {exc!r}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"artifact metadata is a {type(header).__name__}, not an object")
    missing = {"method", "edit_id", "base_fingerprint", "schema_version"} - header.keys()
    if missing:
        raise ArtifactError(f"artifact header lacks {sorted(missing)}")
    if header["schema_version"] > SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact schema {header['schema_version']} is newer than this editstream's {SCHEMA_VERSION}"
        )
    return header, _layout(raw, len(data) - 8 - n), 8 + n


def _loads(text: bytes | str) -> Any:
    """JSON by orjson (a snapshot parses a million headers), by `json` what orjson refuses (NaN)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


_LAYOUTS: dict[tuple, tuple] = {}  # checked layouts by (data size, tensor specs): artifacts of a kind share one
_LAYOUTS_KEPT = 4096


def _layout(specs: dict[str, Any], size: int) -> tuple:
    """The checked tensor layout of a header's tensor `specs` over a data section of `size` bytes,
    from the cache where one of the same specs was checked before."""
    try:
        key = (size, *((name, s["dtype"], tuple(s["shape"]), tuple(s["data_offsets"])) for name, s in specs.items()))
        layout = _LAYOUTS.get(key)
    except (KeyError, TypeError):  # a malformed entry (or one that is not hashable): checked below, and refused
        key, layout = None, None
    if layout is None:
        layout = _check_layout(specs, size)
        if key is not None and len(_LAYOUTS) < _LAYOUTS_KEPT:
            _LAYOUTS[key] = layout
    return layout


def _check_layout(specs: dict[str, Any], size: int) -> tuple:
    layout = []
    for name, spec in specs.items():
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            start, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact tensor {name!r} has a bad header entry {spec!r}: {exc!r}") from exc
        if (
            min(shape, default=0) < 0
            or not 0 <= start <= end <= size
            or end - start != math.prod(shape) * dtype.itemsize
        ):
            raise ArtifactError(
                f"artifact tensor {name!r}: {spec['dtype']} {list(shape)} does not fit bytes {start}-{end} of {size}"
            )
        layout.append((name, spec["dtype"], shape, start, end))
    return tuple(sorted(layout, key=lambda t: t[3]))


def _tensors(body: bytearray, layout: tuple) -> dict[str, torch.Tensor]:
    """The tensors of a data section, sharing its memory."""
    tensors = {}
    for name, dtype, shape, start, end in layout:
        count = (end - start) // _DTYPES[dtype].itemsize
        flat = torch.frombuffer(body, dtype=_DTYPES[dtype], count=count, offset=start) if count else None
        tensors[name] = flat.reshape(shape) if flat is not None else torch.empty(shape, dtype=_DTYPES[dtype])
    return tensors


def _read(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The editstream header and the tensors of a safetensors buffer; the tensors share one copy of
    the data section."""
    header, layout, start = _parse(data)
    return header, _tensors(bytearray(memoryview(data)[start:]), layout)


class PackedArtifact:
    """An applied artifact as a method keeps it: the tensors' bytes in one immutable `bytes`, the
    metadata values in a tuple, the digest raw, and everything artifacts of a kind share (method,
    base model, tensor layout, metadata keys) in one interned `_Form`. About the artifact's data plus
    a few hundred bytes, against ~13 KB for an `Artifact` with its tensor objects and parsed header,
    and immutable, so a snapshot can hold references to it. `unpack` gives back an equal `Artifact`
    whose bytes (and so digest) are the same."""

    __slots__ = ("edit_id", "_form", "_values", "_data", "_digest")

    def __init__(self, artifact: Artifact) -> None:
        self._fill(artifact.to_bytes(), bytes.fromhex(artifact.content_digest()))

    @classmethod
    def from_bytes(cls, data: bytes) -> PackedArtifact:
        """Packed straight from an artifact's bytes (a snapshot's), without making its tensors."""
        packed = cls.__new__(cls)
        packed._fill(data, hashlib.sha256(data).digest())
        return packed

    def _fill(self, data: bytes, digest: bytes) -> None:
        header, layout, start = _parse(data)
        meta = header.get("meta", {})
        self.edit_id = header["edit_id"]
        self._form = _form(header["method"], header["base_fingerprint"], header["schema_version"], layout, meta)
        self._values = _values(meta)
        self._data = bytes(data[start:])
        self._digest = digest

    @property
    def method(self) -> str:
        return self._form.method

    @property
    def meta(self) -> dict[str, Any]:
        """A fresh dict of the metadata (the packed form keeps only the values)."""
        return dict(zip(self._form.meta_keys, self._values, strict=True))

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value, without building the dict."""
        try:
            return self._values[self._form.meta_keys.index(key)]
        except ValueError:
            return default

    def tensor(self, name: str) -> torch.Tensor:
        """A copy of one tensor (small: the methods that keep artifacts packed read a row or two)."""
        for entry in self._form.layout:
            if entry[0] == name:
                _, _, _, start, end = entry
                return _tensors(bytearray(self._data[start:end]), ((name, *entry[1:3], 0, end - start),))[name]
        raise KeyError(f"artifact {self.edit_id} has no tensor {name!r}")

    @property
    def base_fingerprint(self) -> str:
        return self._form.base_fingerprint

    @property
    def kind(self) -> _Form:
        """What artifacts of this kind share (method, base model, tensor layout, metadata keys): one
        check of a kind's shapes holds for every artifact of it."""
        return self._form

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one tensor, None if there is none of that name."""
        return next((entry[2] for entry in self._form.layout if entry[0] == name), None)

    def has(self, name: str) -> bool:
        return any(entry == name for entry, *_ in self._form.layout)

    def content_digest(self) -> str:
        return self._digest.hex()

    def unpack(self) -> Artifact:
        form = self._form
        tensors = _tensors(bytearray(self._data), form.layout)
        artifact = Artifact(form.method, self.edit_id, form.base_fingerprint, tensors, self.meta, form.schema_version)
        artifact._digest = self.content_digest()
        return artifact

    def to_bytes(self) -> bytes:
        """The artifact's bytes, written straight from the packed form: the safetensors header is
        the kind's tensor entries (made once per kind) behind this artifact's metadata, so no tensor
        object is made (a whole snapshot writes a million). They must hash to the digest the artifact
        was read with; where they do not (nothing known does), `Artifact.to_bytes` writes them."""
        form = self._form
        header = _header(form.method, self.edit_id, form.base_fingerprint, form.schema_version, self.meta)
        try:
            data = form.encode(json.dumps(header, sort_keys=True), self._data)
        except UnicodeEncodeError:  # a lone surrogate in a tensor name: not UTF-8, so not what was read
            data = b""
        if hashlib.sha256(data).digest() == self._digest:
            return data
        log.warning("packed artifact %s did not re-encode to its digest; serialising it in full", self.edit_id)
        return self.unpack().to_bytes()


def stacked(packed: Sequence[PackedArtifact], name: str) -> torch.Tensor:
    """Tensor `name` of every artifact in `packed`, stacked (n, *shape), read straight from their bytes
    (no tensor object per artifact: a snapshot of a million edits loads its keys in one go)."""
    if not packed:
        raise ValueError("stacked: no artifacts")
    spans: dict[_Form, slice] = {}
    kinds = set()
    for kind in {p.kind for p in packed}:  # interned: hashed by identity
        entry = next((e for e in kind.layout if e[0] == name), None)
        if entry is None:
            raise KeyError(f"artifacts of {kind.method} have no tensor {name!r}")
        spans[kind] = slice(entry[3], entry[4])
        kinds.add(entry[1:3])
    if len(kinds) > 1:
        raise ArtifactError(f"tensor {name!r} differs in dtype or shape between artifacts: {sorted(kinds, key=str)}")
    ((dtype, shape),) = kinds
    data = b"".join(p._data[spans[p.kind]] for p in packed)
    if not data:
        return torch.empty((len(packed), *shape), dtype=_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype]).reshape(len(packed), *shape)


@dataclass(frozen=True, eq=False)
class _Form:
    """What packed artifacts of one kind share; one object per kind (`_form` interns them), so it is
    compared and hashed by identity (cheap where a million artifacts are grouped by kind)."""

    method: str
    base_fingerprint: str
    schema_version: int
    layout: tuple  # (name, safetensors dtype, shape, start, end) per tensor, in data order
    meta_keys: tuple[str, ...]

    @functools.cached_property
    def _entries(self) -> bytes:
        """The header's tensor entries as safetensors writes them (compact JSON, in data order)."""
        return b"".join(
            b',"%s":{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}'
            % (_escaped(name), dtype.encode(), json.dumps(list(shape), separators=(",", ":")).encode(), start, end)
            for name, dtype, shape, start, end in self.layout
        )

    def encode(self, metadata: str, data: bytes) -> bytes:
        """A safetensors buffer of this kind: the metadata string first, then the tensor entries, the
        header padded with spaces to a multiple of 8, then the data section."""
        header = b'{"__metadata__":{"%s":"%s"}%s}' % (_META_KEY.encode(), _escaped(metadata), self._entries)
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header + data


def _escaped(text: str) -> bytes:
    """`text` as the inside of a JSON string the way safetensors (serde_json) writes it: UTF-8 as is;
    quote, backslash and control characters escaped."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


_FORMS: dict[tuple, _Form] = {}


def _form(method: str, fingerprint: str, schema: int, layout: tuple, meta: dict[str, Any]) -> _Form:
    key = (method, fingerprint, schema, layout, tuple(meta))
    return _FORMS.setdefault(key, _Form(*key))


def _values(meta: dict[str, Any]) -> tuple:
    """The metadata values, short strings interned (an encoder name or a common answer is kept once)."""
    return tuple(sys.intern(v) if type(v) is str and len(v) <= 64 else v for v in meta.values())
