"""Data loaders: the three benchmark formats, plain JSONL, and clear errors."""

import json

import pytest

from editstream.data import detect_format, load_edits, read_records, resolve_dataset
from editstream.errors import DataFormatError


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("counterfact", "counterfact"),
        ("zsre", "zsre"),
        ("hallucination", "hallucination"),
        ("zsre-train", "zsre"),
        ("qaedit", "qaedit"),
    ],
)
def test_benchmark_files_load(name, fmt):
    edits = load_edits(name, limit=5)
    assert len(edits) == 5
    assert all(e.prompt and e.target and e.locality for e in edits)
    assert detect_format(read_records(resolve_dataset(name))[0]) == fmt


def test_counterfact_fields():
    e = load_edits("counterfact", limit=1)[0]
    assert e.edit_id.startswith("cf-") and e.paraphrases and e.subject in e.prompt


def test_qaedit_has_its_five_locality_questions_and_rephrase():
    e = load_edits("qaedit", limit=1)[0]
    assert e.edit_id.startswith("qaedit-") and len(e.locality) == 5 and e.paraphrases


def test_zsre_locality_prefix_is_stripped():
    e = load_edits("zsre", limit=1)[0]
    assert not e.locality[0].prompt.startswith("nq question:")


def test_seeded_shuffle_is_deterministic_and_limit_applies_after():
    a = load_edits("zsre", seed=3, limit=10)
    b = load_edits("zsre", seed=3, limit=10)
    c = load_edits("zsre", limit=10)
    assert [x.edit_id for x in a] == [x.edit_id for x in b] != [x.edit_id for x in c]


def test_jsonl_plain_format(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "The sky is", "target": "green", "paraphrases": ["Skies are"]}) + "\n")
    (edit,) = load_edits(path)
    assert edit.target == "green" and edit.paraphrases == ("Skies are",) and edit.edit_id.startswith("e-")


def test_unknown_format_names_keys(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataFormatError, match="answer.*question"):
        load_edits(path)
    with pytest.raises(DataFormatError):
        detect_format({"foo": 1})


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        load_edits(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DataFormatError, match="JSON"):
        load_edits(bad)
