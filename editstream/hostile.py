"""A catalogue of hostile and malformed fact events, each with the reason the wire contract gives.

Used by the validation tests and by the chaos benchmark's producer (`editstream bench chaos`), so
that what is tested offline is also what is thrown at the running system. Values are what a
producer can XADD (strings or bytes); `reason` is a regular expression over the DLQ reason.
Events whose refusal needs journal state (a retract of an unknown id, an edit_id reused with other
content) are not here: they depend on what was sent before.
"""

from __future__ import annotations

import json

GOOD = {"prompt": "The sky is", "target": "green"}

HOSTILE: dict[str, tuple[dict, str]] = {
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
    "op in capitals": ({**GOOD, "op": "EDIT"}, "unknown op 'EDIT'"),
    "bad utf-8 paraphrases": ({**GOOD, "paraphrases": b'["\xff"]'}, "not valid UTF-8"),
    "bad utf-8 field name": ({**GOOD, b"\xffname": "x"}, "unknown field"),
    "pickle as target": ({"prompt": "p", "target": b"\x80\x04\x95\x10\x00"}, "not valid UTF-8"),
    "escape sequence in subject": ({**GOOD, "subject": "sky\x1b[2J"}, "U\\+001B"),
    "oversized subject": ({**GOOD, "subject": "s" * 2001}, "at most 2000"),
}
