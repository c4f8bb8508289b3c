"""Loaders for the benchmark files in ../shared/data (CounterFact, ZsRE, QAEdit, hallucination).

The format is detected from the records' keys; an unknown format is an error that lists the keys
seen and the formats known.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editstream.edits import EditRequest, LocalityProbe
from editstream.errors import DataFormatError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASET_ALIASES = {
    "counterfact": "counterfact/edit.json",
    "cf": "counterfact/edit.json",
    "zsre": "zsre/edit.json",
    "hallucination": "hallucination/edit.json",
    "qaedit": "qaedit/edit.json",
    "counterfact-train": "counterfact/train.json",
    "zsre-train": "zsre/train.json",
}


def _counterfact(r: dict[str, Any]) -> EditRequest:
    return EditRequest(
        prompt=r["prompt"],
        target=r["target_new"],
        edit_id=f"cf-{r['case_id']}",
        subject=r.get("subject"),
        paraphrases=(r["rephrase_prompt"],) if r.get("rephrase_prompt") else (),
        locality=(LocalityProbe(r["locality_prompt"], r["locality_ground_truth"]),),
    )


def _zsre(r: dict[str, Any]) -> EditRequest:
    loc_prompt = r["loc"].removeprefix("nq question: ")
    return EditRequest(
        prompt=r["src"],
        target=r["alt"],
        edit_id=f"zsre-{r['case_id']}",
        subject=r.get("subject"),
        paraphrases=(r["rephrase"],) if r.get("rephrase") else (),
        locality=(LocalityProbe(loc_prompt, r["loc_ans"]),),
    )


def _qaedit(r: dict[str, Any]) -> EditRequest:
    return EditRequest(
        prompt=r["prompt"],
        target=r["target"],
        edit_id=f"qaedit-{r['id']}",
        subject=r.get("subject"),
        paraphrases=(r["rephrase"],) if r.get("rephrase") else (),
        locality=tuple(LocalityProbe(p["loc"], p["loc_ans"]) for p in r.get("locality", [])),
    )


def _hallucination(r: dict[str, Any]) -> EditRequest:
    return EditRequest(
        prompt=r["prompt"],
        target=r["target_new"],
        subject=r.get("subject"),
        locality=(LocalityProbe(r["locality_prompt"], r["locality_ground_truth"]),),
    )


def _plain(r: dict[str, Any]) -> EditRequest:
    locality = tuple(LocalityProbe(p["prompt"], p["answer"]) for p in r.get("locality", []))
    return EditRequest(
        prompt=r["prompt"],
        target=r["target"],
        edit_id=r.get("edit_id", ""),
        subject=r.get("subject"),
        paraphrases=tuple(r.get("paraphrases", [])),
        locality=locality,
    )


# Checked in order: the first whose keys are all present in a record decides the format.
FORMATS: dict[str, tuple[frozenset[str], Callable[[dict[str, Any]], EditRequest]]] = {
    "counterfact": (frozenset({"case_id", "prompt", "target_new", "rephrase_prompt"}), _counterfact),
    "zsre": (frozenset({"src", "alt", "rephrase", "loc", "loc_ans"}), _zsre),
    "qaedit": (frozenset({"id", "source", "prompt", "target", "rephrase", "locality"}), _qaedit),
    "hallucination": (frozenset({"prompt", "target_new", "locality_prompt"}), _hallucination),
    "editstream": (frozenset({"prompt", "target"}), _plain),
}


def detect_format(record: dict[str, Any]) -> str:
    """Name of the format whose required keys `record` has."""
    for name, (keys, _) in FORMATS.items():
        if keys <= record.keys():
            return name
    raise DataFormatError(
        f"unknown edit-record format with keys {sorted(record)}; known formats and their keys: "
        + "; ".join(f"{n}: {sorted(k)}" for n, (k, _) in FORMATS.items())
    )


def resolve_dataset(name_or_path: str | Path, data_dir: Path | None = None) -> Path:
    """A dataset alias (`counterfact`, `zsre`, ...) or a path, as an existing file path."""
    text = str(name_or_path)
    path = (data_dir or DEFAULT_DATA_DIR) / DATASET_ALIASES[text] if text in DATASET_ALIASES else Path(text)
    if not path.is_file():
        raise DataFormatError(f"dataset {text!r} not found at {path}; give a path or one of {sorted(DATASET_ALIASES)}")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON list file or a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a JSON list of records "
            "or JSON lines, one record per line"
        ) from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path} is neither a JSON list nor JSON lines: {exc}") from exc
    if not all(isinstance(r, dict) for r in records):
        raise DataFormatError(f"{path}: every record must be a JSON object")
    return records


def load_edits(
    name_or_path: str | Path,
    *,
    limit: int | None = None,
    seed: int | None = None,
    data_dir: Path | None = None,
) -> list[EditRequest]:
    """Load a benchmark file as edit requests; shuffled with `seed` (if given), then cut to `limit`."""
    path = resolve_dataset(name_or_path, data_dir)
    records = read_records(path)
    if not records:
        raise DataFormatError(f"{path} holds no records")
    fmt = detect_format(records[0])
    convert = FORMATS[fmt][1]
    edits = [convert(r) for r in records]
    log.info("loaded %d %s records from %s", len(edits), fmt, path)
    if seed is not None:
        random.Random(seed).shuffle(edits)
    return edits[:limit] if limit else edits
