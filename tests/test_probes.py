"""Training negatives and evaluation probes are disjoint: what evaluators measure was never trained on."""

from editstream.demo_facts import demo_facts
from editstream.edits import normalize_prompt
from editstream.methods.recipe.relation import GATE_NEGATIVES
from editstream.probes import GENERAL_PROMPTS, LOCALITY_POOL, SUBJECT_CONTEXTS, SUBJECT_PROBES


def test_router_negatives_share_nothing_with_evaluation_probes():
    evaluation = {p for p, _ in LOCALITY_POOL} | set(SUBJECT_PROBES)
    for fact in demo_facts(200):
        evaluation |= {fact.prompt, *fact.paraphrases}
    evaluation = {normalize_prompt(p) for p in evaluation}
    training = {normalize_prompt(p) for p in (*GENERAL_PROMPTS, *SUBJECT_CONTEXTS)}
    assert not training & evaluation, sorted(training & evaluation)


def test_relation_gate_negatives_are_not_the_subject_probes():
    """The gate is trained on relation-free prompts about a subject; none is a subject-locality probe."""
    probes = {normalize_prompt(p.format("X")) for p in SUBJECT_PROBES}
    negatives = {normalize_prompt(p.format("X")) for p in GATE_NEGATIVES}
    assert not probes & negatives, sorted(probes & negatives)
