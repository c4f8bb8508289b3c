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


def test_the_relation_gates_cache_is_bounded_forgets_and_changes_no_verdict(real_encoder):
    import torch

    from editstream.methods.recipe.checkpoint import PACKAGED
    from editstream.methods.recipe.relation import load_gate

    gate = load_gate(PACKAGED, torch.device("cpu"))
    metas = {
        "e1": {"prompt": "Danielle Darrieux's mother tongue is", "subject": "Danielle Darrieux"},
        "e2": {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"},
        "e3": {"prompt": "Toko Yasuda plays the instrument", "subject": "Toko Yasuda"},
    }
    queries = [
        "What is Danielle Darrieux's native language?",
        "Which city is the Eiffel Tower in?",
        "Toko Yasuda was born in",
    ]
    ids = list(metas)
    first = gate.agree(real_encoder, queries, ids, metas.get)
    assert first[:2] == [True, True] and first[2] is False  # same relation passes; another relation is stopped
    assert list(gate._edits) == ids
    gate.cache_size = 2
    assert gate.agree(real_encoder, queries, ids, metas.get) == first  # cached vectors: the same verdicts
    assert list(gate._edits) == ["e2", "e3"]  # least recently used out
    gate.forget("e3")
    assert list(gate._edits) == ["e2"]
    assert gate.agree(real_encoder, queries[:1], ["e1"], metas.get) == first[:1]
