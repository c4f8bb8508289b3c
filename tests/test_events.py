"""Fact-event validation: good events parse; each kind of bad event is refused with a reason."""

import json

import pytest

from editstream.edits import EditRequest
from editstream.errors import InvalidEditError
from editstream.events import Retract, event_fields, parse_event

GOOD = {"prompt": "The sky is", "target": "green"}

BAD = {
    "missing prompt": ({"target": "x"}, "missing field 'prompt'"),
    "missing target": ({"prompt": "p"}, "missing field 'target'"),
    "empty prompt": ({"prompt": "", "target": "x"}, "'prompt' is empty"),
    "blank target": ({"prompt": "p", "target": "   "}, "'target' is empty"),
    "oversized prompt": ({"prompt": "p" * 2001, "target": "x"}, "at most 2000"),
    "oversized target": ({"prompt": "p", "target": "x" * 501}, "at most 500"),
    "oversized edit_id": ({**GOOD, "edit_id": "i" * 201}, "at most 200"),
    "empty edit_id": ({**GOOD, "edit_id": ""}, "'edit_id' is empty"),
    "empty op": ({**GOOD, "op": ""}, "'op' is empty"),
    "empty subject": ({**GOOD, "subject": ""}, "'subject' is empty"),
    "empty paraphrases": ({**GOOD, "paraphrases": ""}, "'paraphrases' is empty"),
    "zero-width target": ({"prompt": "p", "target": "\u200b\u200b"}, "'target' is empty"),
    "RTL override in target": ({"prompt": "p", "target": "abc\u202edef"}, "U\\+202E"),
    "ANSI escape in target": ({"prompt": "p", "target": "\x1b[31mred"}, "U\\+001B"),
    "id separator in prompt": ({"prompt": "a\x1fb", "target": "x"}, "U\\+001F"),
    "NUL escape in paraphrase JSON": ({**GOOD, "paraphrases": '["a\\u0000b"]'}, "NUL"),
    "deeply nested paraphrases": ({**GOOD, "paraphrases": "[" * 19000 + "]" * 19000}, "nested too deeply"),
    "subject inside a word": ({"prompt": "The Parisian sky is", "target": "x", "subject": "Paris"}, "whole word"),
    "bad utf-8 prompt": ({"prompt": b"\xff\xfe", "target": "x"}, "not valid UTF-8"),
    "bad utf-8 target": ({"prompt": "p", "target": b"ok\xc3"}, "not valid UTF-8"),
    "NUL in prompt": ({"prompt": "a\x00b", "target": "x"}, "NUL"),
    "unknown op": ({**GOOD, "op": "delete"}, "unknown op 'delete'"),
    "unknown field": ({**GOOD, "colour": "red"}, "unknown field 'colour'"),
    "paraphrases bad json": ({**GOOD, "paraphrases": '["a",'}, "not valid JSON"),
    "paraphrases not a list": ({**GOOD, "paraphrases": '{"a": 1}'}, "JSON list"),
    "paraphrases a string": ({**GOOD, "paraphrases": '"a"'}, "JSON list"),
    "paraphrase not a string": ({**GOOD, "paraphrases": "[1]"}, "paraphrases\\[0\\]"),
    "paraphrase empty": ({**GOOD, "paraphrases": '["ok", ""]'}, "paraphrases\\[1\\]"),
    "too many paraphrases": ({**GOOD, "paraphrases": json.dumps(["p"] * 21)}, "at most 20"),
    "oversized paraphrase": ({**GOOD, "paraphrases": json.dumps(["p" * 2001])}, "at most 2000"),
    "subject not in prompt": ({**GOOD, "subject": "ocean"}, "does not occur"),
    "retract without id": ({"op": "retract"}, "missing field 'retracts'"),
    "retract empty id": ({"op": "retract", "retracts": ""}, "'retracts' is empty"),
    "retract with prompt": ({"op": "retract", "retracts": "x", "prompt": "p"}, "takes no 'prompt'"),
    "edit with retracts": ({**GOOD, "retracts": "x"}, "belongs to op 'retract'"),
    "op wrong type": ({**GOOD, "op": 5}, "must be a string|unknown op '5'"),  # on the wire: "5"
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_event_is_refused_with_reason(name):
    fields, reason = BAD[name]
    with pytest.raises(InvalidEditError, match=reason):
        parse_event(fields)


def test_there_are_at_least_25_kinds():
    assert len(BAD) >= 25


def test_good_edit_and_defaults():
    e = parse_event({b"prompt": b"  The sky is ", b"target": "green", b"paraphrases": b'["Skies are"]'})
    assert isinstance(e, EditRequest) and e.prompt == "The sky is" and e.paraphrases == ("Skies are",)
    assert e.edit_id == parse_event(GOOD).edit_id  # default id: hash of (prompt, target)


def test_newlines_in_prompts_and_visible_format_characters_are_fine():
    e = parse_event({"prompt": "Line one\nThe sky is", "target": "\u0917\u094d\u200d\u0930", "subject": "sky"})
    assert e.prompt == "Line one\nThe sky is" and e.subject == "sky"


def test_retract_and_round_trip():
    r = parse_event({"op": "retract", "retracts": "e-1"})
    assert isinstance(r, Retract) and r.retracts == "e-1" and r.edit_id
    e = EditRequest("The sky is", "green", edit_id="x", subject="sky", paraphrases=("Skies are",))
    assert parse_event(event_fields(e)) == e


def test_supersede_key_ignores_unicode_form_case_and_spacing():
    from editstream.edits import normalize_prompt

    composed, decomposed = "The caf\u00e9 is in", "The cafe\u0301 is in"
    assert normalize_prompt(composed) == normalize_prompt(decomposed) == normalize_prompt("the  CAF\u00c9 is in")
    assert normalize_prompt("\uff34he \ufb01sh is") == normalize_prompt("The fish is")
