"""Hard negatives for RECIPE's retriever, built from the train rows by swapping subjects.

For an edit "The mother tongue of Danielle Darrieux is" (subject "Danielle Darrieux"):

* same subject, other relation: another row's prompt with its subject replaced by this one
  ("Danielle Darrieux was born in"); asking it must not fire the edit (subject locality);
* same relation, other subject: this prompt with another row's subject ("The mother tongue of
  Michel Rocard is"); asking it must not fire the edit either (near-identical neighbours).

Both must pick the Knowledge Sentinel. Rows whose subject does not occur in the prompt give a
plain other row's prompt instead. The construction is deterministic in `seed`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from editstream.edits import EditRequest


def _template(edit: EditRequest) -> str | None:
    """The prompt with its subject cut out, or None when the subject does not occur in it."""
    if not edit.subject or edit.subject not in edit.prompt:
        return None
    return edit.prompt.replace(edit.subject, "{}", 1)


def subject_swaps(edits: Sequence[EditRequest], seed: int = 0) -> tuple[list[str], list[str]]:
    """(same subject in another relation's prompt, same prompt with another subject), one each per edit."""
    rng = random.Random(seed)
    templates = [_template(e) for e in edits]
    usable = [i for i, t in enumerate(templates) if t is not None]
    other_relation, other_subject = [], []
    for i, edit in enumerate(edits):
        own = templates[i]
        if own is None or len(usable) < 2:
            j = rng.randrange(len(edits))
            other_relation.append(edits[j].prompt)
            other_subject.append(edits[(j + 1) % len(edits)].prompt)
            continue
        for _ in range(8):  # another relation: a template that differs from this one
            j = rng.choice(usable)
            if templates[j] != own:
                break
        other_relation.append(templates[j].replace("{}", edit.subject, 1))
        for _ in range(8):  # another subject
            k = rng.choice(usable)
            if edits[k].subject != edit.subject:
                break
        other_subject.append(own.replace("{}", edits[k].subject, 1))
    return other_relation, other_subject
