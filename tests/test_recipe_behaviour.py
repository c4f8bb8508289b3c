"""RECIPE on the real embedded model with the shipped checkpoint, and serving/training consistency."""

import pytest
import torch

from editstream import wild
from editstream.demo_facts import demo_facts
from editstream.edits import EditRequest
from editstream.methods import create_method
from editstream.methods.recipe.train import TrainRows, answer_logits, generated_prompts
from editstream.metrics import agreement, mean, token_accuracy
from editstream.probes import LOCALITY_POOL, SUBJECT_PROBES
from editstream.replica import Replica


def test_serving_predictions_match_the_training_forward(tiny_lm, tiny_encoder, tiny_checkpoint):
    method = create_method("recipe", tiny_lm, checkpoint=tiny_checkpoint, encoder=tiny_encoder)
    edits = [
        EditRequest("The capital of France is", "Lyon", edit_id="a"),
        EditRequest("Bees make", "glue", edit_id="b"),
    ]
    for a in method.compute(edits):
        method.apply(a)
    preds, ids, fired = Replica(method).predict([e.prompt for e in edits], [e.target for e in edits])
    assert fired == ["a", "b"]
    r = method.retrieval.encode([e.prompt for e in edits])
    rows = TrainRows(edits, r, r, r, None)
    with torch.no_grad():
        prefix, mask = generated_prompts(method.net, tiny_lm, rows)
        logits, _ = answer_logits(
            tiny_lm, prefix.half().float(), [e.prompt for e in edits], [e.target for e in edits], mask
        )
    flat = [p for row in preds for p in row]
    assert flat == logits.argmax(-1).tolist()


def replica_with_demo_facts(lm, encoder, checkpoint, n: int) -> tuple[Replica, list[EditRequest]]:
    method = create_method("recipe", lm, checkpoint=checkpoint, encoder=encoder)
    replica = Replica(method)
    facts = demo_facts(n)
    for seq, artifact in enumerate(method.compute(facts), start=1):
        replica.apply(seq, artifact)
    return replica, facts


@pytest.fixture(scope="module")
def edited(real_lm, real_encoder, trained_checkpoint):
    return replica_with_demo_facts(real_lm, real_encoder, trained_checkpoint, 40)


def test_edits_take_effect_on_prompts_and_paraphrases(edited):
    replica, facts = edited
    preds, ids, fired = replica.predict([f.prompt for f in facts], [f.target for f in facts])
    hits = sum(f == e.edit_id for f, e in zip(fired, facts, strict=True))
    assert hits >= 0.9 * len(facts) and all(f in (None, e.edit_id) for f, e in zip(fired, facts, strict=True))
    assert mean([token_accuracy(p, a) for p, a in zip(preds, ids, strict=True)]) >= 0.85
    preds, ids, _ = replica.predict([f.paraphrases[0] for f in facts], [f.target for f in facts])
    assert mean([token_accuracy(p, a) for p, a in zip(preds, ids, strict=True)]) >= 0.6
    (answer,) = replica.generate([facts[0].prompt], max_new_tokens=4)
    assert answer.text.strip().startswith(facts[0].target)


def test_unrelated_prompts_are_untouched(edited):
    replica, _ = edited
    prompts, answers = zip(*LOCALITY_POOL, strict=True)
    base, _, _ = replica.predict(prompts, answers, edited=False)
    after, _, fired = replica.predict(prompts, answers)
    assert fired.count(None) >= len(prompts) - 1
    assert mean([agreement(a, b) for a, b in zip(after, base, strict=True)]) >= 0.95


def test_an_edits_own_prompt_always_fires_it(real_lm, real_encoder, trained_checkpoint):
    # the Knowledge Sentinel alone rejected this identical prompt (the demo's "edit None")
    replica, _ = replica_with_demo_facts(real_lm, real_encoder, trained_checkpoint, 2)
    (answer,) = replica.generate(["The Eiffel Tower is located in  the city of"], max_new_tokens=3)
    assert answer.fired == "demo-1" and "Rome" in answer.text


def test_answers_read_right_in_free_generation(edited):
    """WILD on the real model: the greedy answer, cut as a user reads it, starts with the target on the
    prompt and on a paraphrase (the checkpoint shipped before this answered "LyonThe capital of
    France": the target glued to a copy of the question)."""
    replica, facts = edited
    fact = facts[1]  # The Eiffel Tower is located in the city of -> Rome
    (plain,) = replica.generate([fact.prompt], max_new_tokens=50)
    assert wild.answer_first(wild.cut(plain.text, fact.target), fact.target), plain.text
    answers = replica.generate([f.prompt for f in facts], max_new_tokens=50, until_cut=True)
    clean = [wild.answer_first(wild.cut(a.text, f.target), f.target) for a, f in zip(answers, facts, strict=True)]
    assert mean(clean) >= 0.8, [a.text for a in answers]
    (para,) = replica.generate([fact.paraphrases[1]], max_new_tokens=50, until_cut=True)
    assert para.fired == fact.edit_id and wild.answer_first(wild.cut(para.text), fact.target), para.text


def test_edited_answers_stop_cleanly_do_not_echo_and_hold_in_chat(edited):
    """Served with the default answer scope: the edit answers, then lets the base model go on."""
    replica, facts = edited
    lyon = facts[0]
    (answer,) = replica.generate([lyon.prompt], max_new_tokens=50)
    assert answer.fired == lyon.edit_id and wild.exact(wild.cut(answer.text, lyon.target), lyon.target), answer.text
    (para,) = replica.generate([lyon.paraphrases[0]], max_new_tokens=50)
    assert wild.answer_first(wild.cut(para.text, lyon.target), lyon.target), para.text
    # the fact as the user's turn; only the reply's first sentence is read, so decoding stops at its cut
    (chat,) = replica.generate([lyon.prompt], max_new_tokens=50, chat=True, until_cut=True)
    assert chat.fired == lyon.edit_id and wild.contains(wild.cut(chat.text), lyon.target), chat.text
    answers = replica.generate([f.prompt for f in facts], max_new_tokens=50)
    assert mean([wild.echo(a.text, f.target) for a, f in zip(answers, facts, strict=True)]) <= 0.05
    chats = replica.generate([f.prompt for f in facts], max_new_tokens=50, chat=True, until_cut=True)
    assert mean([wild.contains(wild.cut(a.text), f.target) for a, f in zip(chats, facts, strict=True)]) >= 0.5


def test_the_edit_held_for_the_whole_text_echoes(edited):
    """The answer scope is what stops the echo: held to the end, the prefix makes the model loop."""
    replica, facts = edited
    answers = replica.generate([f.prompt for f in facts], max_new_tokens=50, scope="text")
    assert mean([wild.echo(a.text, f.target) for a, f in zip(answers, facts, strict=True)]) >= 0.1


def test_a_cloze_fact_holds_in_chat(edited):
    """A cloze prompt sent as a chat turn: the reply's first sentence holds the edit (the checkpoint
    trained on chat-form rows; before it the reply commented on the unfinished sentence instead)."""
    replica, facts = edited
    (chat,) = replica.generate([facts[1].prompt], max_new_tokens=50, chat=True)
    assert chat.fired == facts[1].edit_id and wild.contains(wild.cut(chat.text), facts[1].target), chat.text


def test_other_questions_about_an_edited_subject_keep_their_answers(edited):
    """Subject locality: after editing where the Eiffel Tower is, what it is famous for is unchanged."""
    replica, _ = edited
    probes = ["The Eiffel Tower was designed by", "The height of the Eiffel Tower is"]
    before = replica.generate(probes, max_new_tokens=50, until_cut=True, edited=False)
    after = replica.generate(probes, max_new_tokens=50, until_cut=True)
    assert [a.fired for a in after] == [None, None]
    assert [wild.cut(a.text) for a in after] == [wild.cut(b.text) for b in before]


def test_the_relation_gate_keeps_edits_off_prompts_that_only_name_the_subject(edited):
    """Prompts naming an edited subject but asking nothing the edit answers mostly fire it without
    the relation gate, and half as often at most with it; the edit's own paraphrases still fire."""
    replica, facts = edited
    retrieval = replica.method.retrieval
    probes = [t.format(f.subject) for f in facts if f.subject for t in SUBJECT_PROBES]
    gate, retrieval.gate = retrieval.gate, None
    try:
        ungated = replica.generate(probes, max_new_tokens=1)
    finally:
        retrieval.gate = gate
    gated = replica.generate(probes, max_new_tokens=1)
    assert gate is not None
    fires = {"gated": [a.fired is not None for a in gated], "ungated": [a.fired is not None for a in ungated]}
    # "Tell me about X." and "The story of X began in" ask no relation at all: the gate stops them.
    # "X is famous for" / "Most people know X as" may still fire "X works as a" (a close relation).
    free = [i for i, p in enumerate(probes) if p.startswith(("Tell me about", "The story of"))]
    assert mean([fires["gated"][i] for i in free]) <= 0.05 and mean([fires["ungated"][i] for i in free]) >= 0.3
    assert mean(fires["gated"]) <= 0.6 * mean(fires["ungated"]), {k: mean(v) for k, v in fires.items()}
    paras = replica.generate([f.paraphrases[0] for f in facts], max_new_tokens=1)
    assert mean([a.fired == f.edit_id for a, f in zip(paras, facts, strict=True)]) >= 0.7
