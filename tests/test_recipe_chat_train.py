"""RECIPE's chat-form training rows put the prefix exactly where the served chat form does."""

import torch

from editstream.data import load_edits
from editstream.generation import chat_text
from editstream.methods.recipe.continuation import pair_ids
from editstream.methods.recipe.train import id_logits, readings
from editstream.prefix import soft_prefix


def test_chat_readings_are_the_question_as_a_user_turn_with_the_reply_starting_at_the_target(tiny_lm):
    edits = load_edits("zsre-train", limit=6)
    r = readings(tiny_lm, edits, chat=True)
    plain = 2 * len(edits)
    assert r.contexts[:plain] == [e.prompt for e in edits] + [e.paraphrases[0] for e in edits]
    asked = [i for i, e in enumerate(edits) if e.prompt.rstrip().endswith("?")]
    assert asked and r.edits[plain:] == asked
    for k, i in enumerate(asked):
        question = edits[i].prompt if i % 2 == 0 else edits[i].paraphrases[0]
        context, offset = r.contexts[plain + k], r.offsets[plain + k]
        assert context == chat_text(tiny_lm, question) and r.leads[plain + k] == ""
        ids = tiny_lm.tokenizer(context, add_special_tokens=False)["input_ids"]
        assert tiny_lm.tokenizer.decode(ids[offset:]).startswith(question)  # the prefix goes right before it
    assert r.offsets[:plain] == [0] * plain


def test_training_logits_with_an_offset_prefix_equal_the_served_chat_forms(tiny_lm):
    """id_logits(offsets=...) and soft_prefix with the same offsets (how Replica serves chat) agree."""
    edits = load_edits("zsre-train", limit=4)
    r = readings(tiny_lm, edits, chat=True)
    chat = [k for k, lead in enumerate(r.leads) if lead == ""]
    torch.manual_seed(1)
    d = tiny_lm.model.get_input_embeddings().weight.shape[1]
    prefix, mask = torch.randn(len(chat), 5, d), torch.ones(len(chat), 5)
    pairs = [pair_ids(tiny_lm, r.contexts[k], r.targets[k], "") for k in chat]
    rows = [c + a for c, a in pairs]
    positions = [list(range(len(c) - 1, len(c) + len(a) - 1)) for c, a in pairs]
    trained = id_logits(tiny_lm, prefix, rows, positions, mask, [r.offsets[k] for k in chat])
    served = []
    for j, (row, pos) in enumerate(zip(rows, positions, strict=True)):  # one row at a time: no padding
        with soft_prefix(tiny_lm.model, prefix[j : j + 1], mask[j : j + 1]) as hooked:
            hooked.offsets = torch.tensor([r.offsets[chat[j]]])
            logits = tiny_lm.model(input_ids=torch.tensor([row])).logits[0]
        served.append(logits[torch.tensor(pos) + 5])
    torch.testing.assert_close(trained, torch.cat(served), atol=2e-4, rtol=1e-4)
    # and the placement matters: the same prefix in front of the template reads differently
    front = id_logits(tiny_lm, prefix, rows, positions, mask)
    assert not torch.allclose(front, trained, atol=1e-3)
