"""Fact-event validation: good events parse; each kind of bad event is refused with a reason."""

import pytest

from editstream.edits import EditRequest
from editstream.errors import InvalidEditError
from editstream.events import Retract, event_fields, parse_event
from editstream.hostile import GOOD
from editstream.hostile import HOSTILE as BAD


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_event_is_refused_with_reason(name):
    fields, reason = BAD[name]
    with pytest.raises(InvalidEditError, match=reason):
        parse_event(fields)


def test_there_are_at_least_40_kinds():
    assert len(BAD) >= 40


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
