"""Fact events (the wire contract) and their validation.

A fact event is a Redis stream entry: a flat map of UTF-8 string fields. `parse_event` turns one
into an `EditRequest` or a `Retract`, or raises `InvalidEditError` whose message is the reason
that goes to the dead-letter stream. Nothing here ever unpickles or evaluates input.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from editstream.edits import EditRequest, default_edit_id
from editstream.errors import InvalidEditError

MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 500
MAX_ID_CHARS = 200
MAX_PARAPHRASES = 20
KNOWN_FIELDS = frozenset({"op", "edit_id", "prompt", "target", "subject", "paraphrases", "retracts"})
OPS = ("edit", "retract")
TEXT_FIELDS = frozenset({"prompt", "paraphrases"})  # may hold newlines and tabs; no field other controls
# Bidirectional overrides and isolates reorder what a reader sees ("Trojan source"); never legitimate here.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Retract:
    """Remove edit `retracts`, so the model answers as it did before that edit."""

    retracts: str
    edit_id: str


def _text(fields: Mapping[str, bytes | str], name: str, limit: int, required: bool) -> str | None:
    raw = fields.get(name)
    if raw is None:
        if required:
            raise InvalidEditError(f"missing field {name!r}")
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEditError(f"field {name!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(raw, str):
        raise InvalidEditError(f"field {name!r} must be a string, got {type(raw).__name__}")
    if "\x00" in raw:
        raise InvalidEditError(f"field {name!r} contains a NUL character")
    _check_characters(name, raw, allow_newlines=name in TEXT_FIELDS)
    value = raw.strip()
    if not value or not _visible(value):
        raise InvalidEditError(f"field {name!r} is empty" + ("" if required else "; omit it instead"))
    if len(value) > limit:
        raise InvalidEditError(f"field {name!r} has {len(value)} characters; at most {limit} allowed")
    return value


def _visible(text: str) -> bool:
    """Whether `text` has a character that is neither white space nor an invisible format character."""
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in text)


def _check_characters(name: str, text: str, allow_newlines: bool) -> None:
    """Refuse control characters (ANSI escapes, the id separator \\x1f, ...) and bidi overrides."""
    allowed = "\n\t\r" if allow_newlines else ""
    for i, c in enumerate(text):
        if (unicodedata.category(c) == "Cc" and c not in allowed) or c in BIDI_CONTROLS:
            raise InvalidEditError(f"field {name!r} holds the control character U+{ord(c):04X} at position {i}")


def _paraphrases(fields: Mapping[str, bytes | str]) -> tuple[str, ...]:
    raw = _text(fields, "paraphrases", MAX_PROMPT_CHARS * MAX_PARAPHRASES, required=False)
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidEditError(f"field 'paraphrases' is not valid JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise InvalidEditError(
            "field 'paraphrases' is nested too deeply; expected a flat JSON list of strings"
        ) from None
    if not isinstance(value, list):
        raise InvalidEditError(f"field 'paraphrases' must be a JSON list of strings, got {type(value).__name__}")
    if len(value) > MAX_PARAPHRASES:
        raise InvalidEditError(f"field 'paraphrases' has {len(value)} entries; at most {MAX_PARAPHRASES} allowed")
    out = []
    for i, p in enumerate(value):
        if not isinstance(p, str) or not p.strip():
            raise InvalidEditError(f"paraphrases[{i}] must be a non-empty string, got {p!r:.60}")
        if len(p) > MAX_PROMPT_CHARS:
            raise InvalidEditError(f"paraphrases[{i}] has {len(p)} characters; at most {MAX_PROMPT_CHARS} allowed")
        if "\x00" in p:
            raise InvalidEditError(f"paraphrases[{i}] contains a NUL character")
        _check_characters(f"paraphrases[{i}]", p, allow_newlines=True)
        if not _visible(p):
            raise InvalidEditError(f"paraphrases[{i}] must be a non-empty string, got {p!r:.60}")
        out.append(p.strip())
    return tuple(out)


def parse_event(fields: Mapping[bytes | str, bytes | str]) -> EditRequest | Retract:
    """Validate one stream entry; raises `InvalidEditError` with the reason if it is bad."""
    norm: dict[str, bytes | str] = {}
    for key, value in fields.items():
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if k not in KNOWN_FIELDS:
            raise InvalidEditError(f"unknown field {k!r}; known fields: {sorted(KNOWN_FIELDS)}")
        norm[k] = value
    op = _text(norm, "op", 16, required=False)
    op = "edit" if op is None else op
    if op not in OPS:
        raise InvalidEditError(f"unknown op {op!r}; expected one of {OPS}")
    edit_id = _text(norm, "edit_id", MAX_ID_CHARS, required=False)
    if op == "retract":
        target_id = _text(norm, "retracts", MAX_ID_CHARS, required=True)
        for extra in ("prompt", "target", "paraphrases", "subject"):
            if extra in norm:
                raise InvalidEditError(f"a retract takes no {extra!r} field")
        return Retract(target_id, edit_id or f"r-{default_edit_id('retract', target_id)[2:]}")
    if "retracts" in norm:
        raise InvalidEditError("field 'retracts' belongs to op 'retract', not 'edit'")
    prompt = _text(norm, "prompt", MAX_PROMPT_CHARS, required=True)
    target = _text(norm, "target", MAX_TARGET_CHARS, required=True)
    subject = _text(norm, "subject", MAX_PROMPT_CHARS, required=False)
    if subject and not re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt):
        raise InvalidEditError(f"subject {subject!r} does not occur in the prompt as a whole word or phrase")
    return EditRequest(
        prompt=prompt, target=target, edit_id=edit_id or "", subject=subject, paraphrases=_paraphrases(norm)
    )


def edit_to_payload(edit: EditRequest) -> dict[str, object]:
    """The JSON form of an accepted edit, as the journal stores it."""
    return {
        "op": "edit",
        "edit_id": edit.edit_id,
        "prompt": edit.prompt,
        "target": edit.target,
        "subject": edit.subject,
        "paraphrases": list(edit.paraphrases),
    }


def edit_from_payload(payload: Mapping[str, object]) -> EditRequest:
    return EditRequest(
        prompt=str(payload["prompt"]),
        target=str(payload["target"]),
        edit_id=str(payload["edit_id"]),
        subject=payload.get("subject") or None,  # type: ignore[arg-type]
        paraphrases=tuple(payload.get("paraphrases") or ()),  # type: ignore[arg-type]
    )


def event_fields(edit: EditRequest) -> dict[str, str]:
    """The stream fields a producer sends for `edit` (the inverse of `parse_event`)."""
    fields = {"op": "edit", "edit_id": edit.edit_id, "prompt": edit.prompt, "target": edit.target}
    if edit.subject:
        fields["subject"] = edit.subject
    if edit.paraphrases:
        fields["paraphrases"] = json.dumps(list(edit.paraphrases))
    return fields
