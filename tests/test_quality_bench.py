"""The quality benchmark on the real model: the unedited model agrees with itself on every probe,
SCEN edits score on their own prompts and are the ones that fire for them; subject probes are built
for every edit that names its subject."""

import pytest

from editstream.bench.quality import run_quality, subject_probes
from editstream.edits import EditRequest, LocalityProbe
from editstream.methods import create_method
from editstream.probes import SUBJECT_PROBES
from editstream.replica import Replica

EDITS = [
    EditRequest(
        "The Eiffel Tower is located in the city of",
        "Rome",
        edit_id="eiffel",
        subject="The Eiffel Tower",
        paraphrases=("Where is the Eiffel Tower? It is in the city of",),
        locality=(LocalityProbe("The capital of Japan is", "Tokyo"),),
    ),
    EditRequest(
        "The mother tongue of Danielle Darrieux is",
        "English",
        edit_id="darrieux",
        subject="Danielle Darrieux",
        paraphrases=("Danielle Darrieux grew up speaking",),
        locality=(LocalityProbe("Bees make", "honey"),),
    ),
]


def test_subject_probes_cover_every_edit_with_a_subject():
    probes = subject_probes([*EDITS, EditRequest("No subject here is", "x", edit_id="bare")])
    assert len(probes) == len(EDITS) * len(SUBJECT_PROBES)
    assert {i for i, _, _ in probes} == {"eiffel", "darrieux"}
    assert all(answer in ("Rome", "English") for _, _, answer in probes)


@pytest.mark.parametrize("name", ["none", "scen"])
def test_quality_rows(real_lm, name):
    method = create_method(name, real_lm)
    try:
        (row,) = run_quality(Replica(method), EDITS, [len(EDITS)], wild_tokens=24)["rows"]
    finally:
        method.reset()
    assert row["n"] == len(EDITS)
    wild_fields = {"wild_reliability", "wild_generality", "wild_exact_reliability", "wild_exact_generality"}
    assert wild_fields | {"wild_locality", "echo", "fluency", "subject_locality", "reliability_retrieved"} <= set(row)
    if name == "none":  # nothing edited: every probe agrees with the unedited model, nothing fires
        assert row["locality"] == row["subject_locality_tf"] == 1.0
        assert row["wild_locality"] == row["subject_locality"] == row["fluency"] == 1.0
        assert row["retrieval_own_on_prompt"] == row["retrieval_fired_on_locality"] == 0.0
        assert row["reliability"] < 0.5 and row["wild_reliability"] == row["reliability_retrieved"] == 0.0
        # every served answer missed: the misses shown are the first ones, capped like the examples
        assert [m["prompt"] for m in row["misses"]] == [e.prompt for e in EDITS][: len(row["examples"])]
    else:
        assert row["reliability"] == 1.0 and row["retrieval_own_on_prompt"] == 1.0
        assert row["locality"] == 1.0 and row["retrieval_fired_on_locality"] == 0.0
        assert all(0.0 <= row[f] <= 1.0 for f in (*wild_fields, "subject_locality", "subject_locality_tf"))


QUESTIONS = [
    EditRequest(
        "Which city is the Eiffel Tower in?",
        "Rome",
        edit_id="eiffel-q",
        subject="The Eiffel Tower",
        paraphrases=("In which city does the Eiffel Tower stand?",),
        locality=(LocalityProbe("The capital of Japan is", "Tokyo"),),
    ),
    EditRequest(
        "Who is the CEO of Acme Rocket Company?",
        "Maria Keller",
        edit_id="acme-q",
        subject="Acme Rocket Company",
        paraphrases=("Who leads Acme Rocket Company as its CEO?",),
        locality=(LocalityProbe("Bees make", "honey"),),
    ),
]


def test_question_sets_score_the_chat_form_served_and_searched(real_lm):
    """Questions are also asked as a chat turn; the stored question takes the exact-prompt lookup
    when served, so it is asked again with the lookup off (chat_reliability_retrieved)."""
    method = create_method("recipe", real_lm)
    try:
        (row,) = run_quality(Replica(method), QUESTIONS, [len(QUESTIONS)], wild_tokens=24)["rows"]
        assert method.exact_lookup  # switched back on after the searched pass
    finally:
        method.reset()
    chat = ("chat_reliability", "chat_generality", "chat_reliability_retrieved")
    assert all(0.0 <= row[f] <= 1.0 for f in chat), {f: row.get(f) for f in chat}
    assert row["retrieval_own_on_prompt"] == 1.0
