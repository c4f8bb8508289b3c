"""SCEN on the real model: an edit fires for its fact, rows of a batch are routed on their own, a
retract restores the base model exactly, artifacts are small; the bank grows past its capacity.
Routing keys on the whole subject: a namesake does not fire it, a text that starts with it does.
The relation gate keeps an edit off other questions about its subject. Two editors share a burst
of facts."""

import pytest
import torch

from editstream.edits import EditRequest
from editstream.events import edit_to_payload
from editstream.generation import greedy
from editstream.methods import create_method
from editstream.metrics import token_accuracy
from editstream.models import EMBEDDED_LLM
from editstream.probes import SUBJECT_PROBES
from editstream.replica import Replica
from services.transport.store import RedisStore, connect
from services.workers.editor import Editor
from services.workers.ingest import content_hash

FACT = EditRequest("The Eiffel Tower is located in the city of", "Rome", edit_id="eiffel", subject="The Eiffel Tower")
UNRELATED = ("Bees make", "honey")


@pytest.fixture(scope="module")
def replica(real_lm):
    method = create_method("scen", real_lm)
    yield Replica(method)
    method.reset()


def test_an_edit_fires_for_its_fact_and_leaves_other_rows_alone(replica):
    base, _, _ = replica.predict([FACT.prompt, UNRELATED[0]], [FACT.target, UNRELATED[1]], edited=False)
    (artifact,) = replica.method.compute([FACT])
    assert artifact.nbytes < 100_000
    replica.apply(1, artifact)
    preds, ids, fired = replica.predict([FACT.prompt, UNRELATED[0]], [FACT.target, UNRELATED[1]])
    assert fired == ["eiffel", None]  # each row routed on its own
    assert token_accuracy(preds[0], ids[0]) == 1.0 and base[0] != preds[0]
    assert preds[1] == base[1]
    rephrased = "Everyone knows the answer. The Eiffel Tower is located in the city of"
    _, _, fired = replica.predict([rephrased], [FACT.target])
    assert fired == ["eiffel"]
    (answer,) = replica.generate([FACT.prompt], max_new_tokens=3)
    assert "Rome" in answer.text and answer.fired == "eiffel"


def test_the_relation_gate_keeps_an_edit_off_other_questions_about_its_subject(replica):
    """The neuron keys on the subject, so without the gate the expert fires on other questions about
    it; with the gate, those whose relation differs get the unedited answer. The gate is not perfect
    ("The Eiffel Tower is famous for" passes it: cosine 0.51, threshold 0.46), so this checks the
    probes it turns away, not all four."""
    if not replica.method.edit_ids():
        replica.apply(replica.version + 1, replica.method.compute([FACT])[0])
    probes = [t.format(FACT.subject) for t in SUBJECT_PROBES]
    gate, replica.method.gate = replica.method.gate, None
    try:
        _, _, ungated = replica.predict(probes, ["x"] * len(probes))
    finally:
        replica.method.gate = gate
    before = replica.generate(probes, max_new_tokens=12, edited=False, until_cut=True)
    after = replica.generate(probes, max_new_tokens=12, until_cut=True)
    turned_away = [i for i, (u, a) in enumerate(zip(ungated, after, strict=True)) if u and a.fired is None]
    assert f"Tell me about {FACT.subject}." in [probes[i] for i in turned_away] and len(turned_away) >= 2
    assert [after[i].text for i in turned_away] == [before[i].text for i in turned_away]
    _, _, fired = replica.predict([FACT.prompt], [FACT.target])
    assert fired == ["eiffel"]


def test_an_answered_edit_lets_the_base_model_go_on(replica, real_lm):
    """Edit scope "answer": once the expert's row has said the target, the base model continues from
    the prompt and the answer (SCEN decides what fired while routing the prefill, after the plan
    is built: the release must still see it)."""
    if not replica.method.edit_ids():
        replica.apply(replica.version + 1, replica.method.compute([FACT])[0])
    (answer,) = replica.generate([FACT.prompt], max_new_tokens=20, scope="answer")
    said = " " + FACT.target
    assert answer.fired == "eiffel" and answer.text.startswith(said)
    (rest,) = greedy(real_lm, [FACT.prompt + said], 20).texts
    assert len(answer.text) > len(said) and rest.startswith(answer.text[len(said) :])


def test_a_replica_keeps_no_negatives_it_never_uses(replica, real_lm):
    """Negatives are mined in compute (an editor's); applying an artifact must not store them."""
    fact = EditRequest("Bees make", "wax", edit_id="bees", subject="Bees")
    (artifact,) = replica.method.compute([fact])
    assert "bees" in replica.method.earlier  # the computing side remembers it
    other = create_method("scen", real_lm, relation_gate=False)
    Replica(other).apply(1, artifact)
    assert other.edit_ids() == ["bees"] and len(other.earlier) == 0


def test_retract_restores_the_unedited_logits_exactly(replica, real_lm):
    if not replica.method.edit_ids():
        replica.apply(replica.version + 1, replica.method.compute([FACT])[0])
    replica.retract(replica.version + 1, "eiffel")
    batch = real_lm.tokenizer([FACT.prompt], return_tensors="pt")
    with torch.inference_mode(), replica.method.query_context([FACT.prompt]) as plan:
        edited = real_lm.model(**batch).logits
    plain = real_lm.model(**batch).logits
    assert plan.fired == [None] and torch.equal(edited, plain)


def test_the_bank_grows_past_its_initial_capacity(real_lm):
    method = create_method("scen", real_lm, capacity=2, expert_steps=2)
    edits = [EditRequest(f"Fact number {i} is about", f"thing{i}", edit_id=f"f{i}") for i in range(5)]
    for artifact in method.compute(edits):
        method.apply(artifact)
    assert len(method.bank) == 5 and len(method.bank.bias) >= 5
    method.remove("f2")
    assert len(method.bank) == 4 and "f2" not in method.bank.slots


def test_routing_tells_namesakes_apart_and_finds_the_subject_at_the_start_of_a_text(real_lm):
    method = create_method("scen", real_lm)
    edits = [
        EditRequest("The job of William Hardy Wilson is", "dentist", subject="William Hardy Wilson", edit_id="w"),
        EditRequest("The official language of Ireland is", "Klingon", subject="Ireland", edit_id="i"),
    ]
    for artifact in method.compute(edits):
        method.apply(artifact)
    queries = {
        "The profession of Hack Wilson is": None,  # shares only the last name: fired "w" keyed on one token
        "Everyone knows that William Hardy Wilson works as a": "w",
        "William Hardy Wilson works as a": "w",  # the subject starts the text
        "Ireland's official language is": "i",  # "Ireland" starts a text as I-re-land, not as " Ireland"
        "The official language of Iceland is": None,
    }
    _, _, fired = Replica(method).predict(list(queries), ["x"] * len(queries))
    assert dict(zip(queries, fired, strict=True)) == queries


def test_two_editors_share_a_burst_of_facts(redis_server):
    """SCEN takes one journal entry at a time, so a second editor gets work while the first trains;
    both artifacts land in the store, each computed once."""
    store = RedisStore(connect(redis_server.url), "share")
    facts = [FACT, EditRequest("The Colosseum is located in the city of", "Paris", edit_id="colosseum")]
    for fact in facts:
        payload = edit_to_payload(fact)
        store.journal_append(fact.edit_id, content_hash(payload), payload, 0.0)
    threads = torch.get_num_threads()
    try:
        editors = [
            Editor(redis_server.url, "scen", EMBEDDED_LLM, "share", f"editor-{i}", method_options={"expert_steps": 2})
            for i in range(2)
        ]
        assert [e.step() for e in editors] == [1, 1]  # the first editor left the second fact to the other
    finally:
        torch.set_num_threads(threads)
    assert [e.computed for e in editors] == [1, 1]
    stored = store.get_artifacts("scen", [1, 2])
    assert all(stored.values())


def test_a_captured_layer_input_keeps_the_attention_mask_gpt2_passes_positionally(real_lm):
    """GPT-2 hands its blocks the attention mask as a positional argument: a left-padded row run from
    a captured layer input must read as the same text alone (it attended to the padding before)."""
    import transformers as tf

    from editstream.methods.scen.layers import capture_layer_input, mlp_input

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=len(real_lm.tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    tok = real_lm.tokenizer
    texts = ["The Eiffel Tower", "A much longer text about something else entirely"]
    batch, alone = (tok(t, return_tensors="pt", padding=True, add_special_tokens=False) for t in (texts, texts[:1]))
    padded = mlp_input(model, 1, capture_layer_input(model, 1, batch["input_ids"], batch["attention_mask"]))
    single = mlp_input(model, 1, capture_layer_input(model, 1, alone["input_ids"], alone["attention_mask"]))
    n = single.shape[1]
    torch.testing.assert_close(padded[0, -n:], single[0], rtol=0, atol=1e-5)


def test_an_edit_fires_when_its_question_is_the_user_turn_of_a_chat(real_lm):
    """In the chat form the template's head comes before the question: routing must read the
    question's own tokens (it read the head's, and SCEN's chat form fired on ~2% of questions)."""
    fact = EditRequest("Which city is the Eiffel Tower located in?", "Rome", edit_id="q", subject="the Eiffel Tower")
    method = create_method("scen", real_lm)
    replica = Replica(method)
    replica.apply(1, *method.compute([fact]))
    other = "Which city is the Statue of Liberty located in?"
    chat = replica.generate([fact.prompt, other], max_new_tokens=12, chat=True)
    assert [a.fired for a in chat] == ["q", None], chat
    assert "Rome" in chat[0].text and "Rome" not in chat[1].text, chat
