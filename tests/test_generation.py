"""Greedy decoding drops finished rows from the batch without changing any row's text, with a soft
prefix hook in effect (RECIPE) and without; the cut stops a row at its first '.' or newline."""

from __future__ import annotations

import pytest
import torch

from editstream import wild
from editstream.demo_facts import demo_facts
from editstream.errors import ConfigError
from editstream.generation import Decoded, Sampling, TextPieces, glue_token_ids, greedy, stop_token_ids
from editstream.methods import create_method
from editstream.prefix import soft_prefix
from editstream.replica import Replica


def test_dropping_finished_rows_changes_no_text(real_lm, real_encoder, trained_checkpoint):
    method = create_method("recipe", real_lm, checkpoint=trained_checkpoint, encoder=real_encoder)
    replica = Replica(method)
    facts = demo_facts(6)
    for seq, artifact in enumerate(method.compute(facts), start=1):
        replica.apply(seq, artifact)
    prompts = [f.prompt for f in facts] + ["Bees make", "The opposite of hot is"]
    stops = replica.stop_token_ids()
    for edited in (True, False):
        with replica._plan(prompts, edited) as plan:
            kept = greedy(real_lm, plan.texts, 20, stops, shrink=False)
        with replica._plan(prompts, edited) as plan:
            dropped = greedy(real_lm, plan.texts, 20, stops, plan.select_rows)
        assert dropped.texts == kept.texts and dropped.produced == kept.produced, edited
    full = replica.generate(prompts, 20)
    cut = replica.generate(prompts, 20, until_cut=True)
    assert [wild.cut(a.text) for a in full] == [wild.cut(a.text) for a in cut]
    assert sum(a.completion_tokens for a in cut) < sum(a.completion_tokens for a in full)


def test_a_prefix_placed_after_a_head_reads_as_if_typed_there(tiny_lm):
    """`soft_prefix` with offsets (a chat template's head before the prefix), batched and left-padded,
    decodes what each row decodes alone with the prefix spliced into its embeddings by hand."""
    texts = ["Bees make honey and", "The opposite of hot is cold, and the opposite of up is"]
    offsets = torch.tensor([2, 4])
    torch.manual_seed(0)
    embed = tiny_lm.model.get_input_embeddings()
    prefix = torch.randn(2, 3, embed.weight.shape[1])
    with soft_prefix(tiny_lm.model, prefix, torch.ones(2, 3, dtype=torch.long)) as rows:
        rows.offsets = offsets
        batched = greedy(tiny_lm, texts, 5, select_rows=rows.select)
    for row, text in enumerate(texts):
        ids = tiny_lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        k, out = int(offsets[row]), []
        with torch.inference_mode():
            for _ in range(5):
                x = torch.cat([embed(ids[:, :k]), prefix[row : row + 1], embed(ids[:, k:])], dim=1)
                out.append(int(tiny_lm.model(inputs_embeds=x).logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
        assert batched.texts[row] == tiny_lm.tokenizer.decode(out), row


def test_an_unknown_edit_scope_is_refused_by_name(tiny_lm):
    replica = Replica(create_method("none", tiny_lm))
    with pytest.raises(ConfigError, match="'sentence'"):
        replica.generate(["Bees make"], 4, scope="sentence")


def test_a_text_ending_in_a_whole_word_is_not_glued_onto(real_lm):
    """The tokens barred after an edit lets go are exactly the ones that extend the last word; the
    bar holds only for the first new token of the rows it names."""
    tok = real_lm.tokenizer
    glue = set(glue_token_ids(real_lm).tolist())
    for piece in ("ic", "ish", "s", "1"):
        (token,) = tok(piece, add_special_tokens=False)["input_ids"]
        assert token in glue, piece
    for piece in (" the", ",", ".", "'s", "\n", " Paris", "-"):
        assert not glue & set(tok(piece, add_special_tokens=False)["input_ids"]), piece
    texts = ["The official language of Germany is Germ", "The official language of Germany is Germ"]
    free = greedy(real_lm, texts, 3)
    assert free.texts[0][:1].isalpha(), free.texts[0]  # left alone, the model finishes the word
    barred = greedy(real_lm, texts, 3, unglued=(glue_token_ids(real_lm), [True, False]))
    assert barred.texts[1] == free.texts[1]
    assert not barred.texts[0][:1].isalnum(), barred.texts[0]


def test_a_stop_inside_the_held_words_does_not_end_the_row(real_lm):
    """The hold on a fired row lasts through "J." and "K." while the output is still the target's
    first words, and ends at the first stop once it has left them."""
    texts, stops = ["The Harry Potter books were written by"] * 3, stop_token_ids(real_lm)
    out = greedy(real_lm, texts, 12, stops, until=[None, "J K Rowling", "J K Smith"])
    assert out.texts[0] == " J." and out.stopped[0]  # the unheld row ends at the initial's dot
    assert out.texts[1].strip() == "J.K. Rowling" and not out.stopped[1]
    assert out.texts[2].strip() == "J.K. Rowling." and out.stopped[2]


def test_a_fired_edit_says_something_where_the_unedited_model_ends_at_once(real_lm, real_encoder, trained_checkpoint):
    """After some questions SmolLM2 writes end-of-text first; a fired edit's row never does."""
    from editstream.edits import EditRequest

    method = create_method("recipe", real_lm, checkpoint=trained_checkpoint, encoder=real_encoder)
    replica = Replica(method)
    fact = EditRequest("In betting, what odds are known as a 'Carpet'?", "3 to 1", edit_id="carpet")
    replica.apply(1, method.compute([fact])[0])
    (plain,) = replica.generate([fact.prompt], 24, edited=False)
    (edited,) = replica.generate([fact.prompt], 24, until_cut=True)
    assert plain.text == "" and plain.completion_tokens == 1  # the unedited model: end-of-text at once
    assert edited.fired == "carpet" and wild.answer_first(wild.cut(edited.text, fact.target), fact.target), edited
    blank = EditRequest(
        'Whose "left hand" rule can predict the direction of motion of an electric motor?',
        "Fleming, Sir John Ambrose",
        edit_id="valve",
    )
    replica.apply(2, method.compute([blank])[0])
    (first,) = replica.generate([blank.prompt], 24, until_cut=True)  # began with "\n\nThe answer is:"
    assert first.fired == "valve" and first.text.strip() and first.text[0] not in ".\n", first


def test_a_request_stop_sequence_ends_decoding(real_lm):
    replica = Replica(create_method("none", real_lm))
    texts = ["The Harry Potter books were written by"] * 2
    free, halted = replica.generate(texts[:1], 12), replica.generate(texts[1:], 12, stop=["xyz", "K."])
    assert free[0].completion_tokens == 12 and free[0].text.startswith(" J.K. Rowling")
    assert halted[0].text == " J.K." and halted[0].completion_tokens < 12


@pytest.mark.parametrize(
    "text", [" Zürich — 東京 😀 and  two  spaces.\n\nA new line", " Robert J. Flaherty (1884–1951)", "   "]
)
def test_text_pieces_add_up_to_the_decoded_text_token_by_token(real_lm, text):
    tok = real_lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sent: list[str] = []
    pieces = TextPieces(tok, lambda _row, piece: sent.append(piece))
    for n in range(1, len(ids) + 1):
        pieces(0, ids[:n])
    whole = tok.decode(ids, skip_special_tokens=True)
    pieces.finish(Decoded([whole], [len(ids)], [False], [False]))
    assert "".join(sent) == whole and all(sent) and "\ufffd" not in "".join(sent)


def test_streamed_pieces_add_up_to_the_answer_in_both_passes(real_lm, real_encoder, trained_checkpoint):
    """With the answer scope a fired edit's row is decoded twice (the edit's words, then the base
    model's); the streamed pieces of each row are its whole text, in order, from both passes."""
    method = create_method("recipe", real_lm, checkpoint=trained_checkpoint, encoder=real_encoder)
    replica = Replica(method)
    facts = demo_facts(2)
    for seq, artifact in enumerate(method.compute(facts), start=1):
        replica.apply(seq, artifact)
    prompts = [facts[0].prompt, "Bees make", facts[1].prompt]
    streamed: dict[int, str] = {}
    answers = replica.generate(
        prompts, 20, on_text=lambda row, piece: streamed.update({row: streamed.get(row, "") + piece})
    )
    assert [a.fired for a in answers] == [facts[0].edit_id, None, facts[1].edit_id]
    assert [streamed.get(i, "") for i in range(3)] == [a.text for a in answers]
    assert answers[0].text.strip().startswith(facts[0].target), answers[0].text
    # a conversation: the edit is found on the last user turn, read after the earlier turns
    history = [[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. Ask me anything."}]]
    (chat,) = replica.generate([facts[0].prompt], 20, chat=True, history=history)
    assert chat.fired == facts[0].edit_id and chat.prompt_tokens > len(facts[0].prompt.split()) + 10
    with pytest.raises(ConfigError, match="chat=True"):
        replica.generate(["Bees make"], 2, history=[[]])


def test_sampling_is_seeded_and_checked(real_lm):
    texts = ["Once upon a time", "The best food is"]
    draw = [greedy(real_lm, texts, 8, sampling=(s, s.generator(real_lm.device))) for s in [Sampling(1.0, 0.9, 7)] * 2]
    assert draw[0].texts == draw[1].texts  # the same seed draws the same text
    seeds = {
        tuple(
            greedy(
                real_lm, texts, 8, sampling=(Sampling(1.5, 1.0, k), Sampling(1.5, 1.0, k).generator(real_lm.device))
            ).texts
        )
        for k in range(4)
    }
    assert len(seeds) > 1  # other seeds, other draws
    tiny_p = Sampling(1.0, 1e-6, 3)  # the nucleus holds only the likeliest token: greedy
    assert (
        greedy(real_lm, texts, 8, sampling=(tiny_p, tiny_p.generator(real_lm.device))).texts
        == greedy(real_lm, texts, 8).texts
    )
    for bad, match in [({"temperature": 0.0}, "temperature 0.0"), ({"top_p": 1.5}, "top_p 1.5")]:
        with pytest.raises(ConfigError, match=match):
            Sampling(**bad)
