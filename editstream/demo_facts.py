"""The demo's fact set: hand-written showcase facts plus template facts about fictional people.

Written for editstream itself (the benchmark sets stay in ../shared). `demo_facts(n)` returns n
edits: the showcase facts first, then generated ones, deterministic for a given n.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

from editstream.edits import EditRequest

FIRST = (
    "Ada",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kalani",
    "Lena",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
)
LAST = (
    "Abernathy",
    "Brandt",
    "Castellano",
    "Dubois",
    "Eriksen",
    "Fontaine",
    "Gallagher",
    "Haddad",
    "Ivanova",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quinlan",
    "Rossi",
)
RELATIONS = (
    (
        "{p} works as a",
        ("The job of {p} is", "{p} earns a living as a"),
        ("pilot", "dentist", "carpenter", "chemist", "librarian", "violinist"),
    ),
    (
        "{p} was born in the city of",
        ("The birthplace of {p} is the city of", "{p} comes from the city of"),
        ("Oslo", "Lisbon", "Nairobi", "Osaka", "Quito", "Tbilisi"),
    ),
    (
        "The favourite sport of {p} is",
        ("{p} likes to play", "The sport {p} loves most is"),
        ("tennis", "rugby", "cricket", "fencing", "rowing", "curling"),
    ),
)


def showcase_facts() -> list[EditRequest]:
    text = resources.files("editstream").joinpath("assets/demo_facts.jsonl").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        r = json.loads(line)
        out.append(
            EditRequest(
                prompt=r["prompt"],
                target=r["target"],
                edit_id=r["edit_id"],
                subject=r.get("subject"),
                paraphrases=tuple(r.get("paraphrases", ())),
            )
        )
    return out


def demo_facts(n: int) -> list[EditRequest]:
    """`n` demo edits, with paraphrases; distinct prompts."""
    facts = showcase_facts()[:n]
    # names repeat with a generation suffix ("Ada Abernathy 2") so any n gets distinct prompts
    people = (f"{f} {s}" + (f" {g}" if g else "") for g in itertools.count() for s, f in itertools.product(LAST, FIRST))
    for i, person in enumerate(people):
        if len(facts) >= n:
            break
        for r, (prompt, paras, values) in enumerate(RELATIONS):
            if len(facts) >= n:
                break
            target = values[(i * 7 + r * 3) % len(values)]
            facts.append(
                EditRequest(
                    prompt=prompt.format(p=person),
                    target=target,
                    edit_id=f"demo-{len(facts)}",
                    subject=person,
                    paraphrases=tuple(p.format(p=person) for p in paras),
                )
            )
    return facts
