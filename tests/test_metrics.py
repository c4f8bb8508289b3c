"""Metrics against hand-computed cases."""

import pytest
import torch

from editstream.metrics import PairBatch, agreement, answer_predictions, encode_pairs, exact_match, token_accuracy


def test_token_accuracy_and_agreement():
    assert token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([], []) == 1.0
    assert agreement([7, 8], [7, 8]) == 1.0
    assert agreement([7, 8], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        token_accuracy([1], [1, 2])


def test_answer_predictions_reads_the_position_before_each_answer_token():
    # one row of 5 tokens; the answer is the last 2 tokens (positions 3, 4), predicted at positions 2, 3
    batch = PairBatch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), [[4, 1]], [3])
    logits = torch.zeros(1, 5, 6)
    logits[0, 2, 4] = 1.0  # predicts 4 at position 3: right
    logits[0, 3, 2] = 1.0  # predicts 2 at position 4: wrong (answer 1)
    logits[0, 4, 1] = 5.0  # after the answer: must be ignored
    assert answer_predictions(logits, batch) == [[4, 2]]


def test_encode_pairs_left_pads_and_locates_answers(real_lm):
    tok = real_lm.tokenizer
    batch = encode_pairs(tok, ["The capital of France is", "Hi"], ["Paris", "there friend"])
    for row, (start, ans) in enumerate(zip(batch.answer_start, batch.answer_ids, strict=True)):
        assert batch.input_ids[row, start : start + len(ans)].tolist() == ans
        assert batch.attention_mask[row, -1] == 1
    assert tok.decode(batch.answer_ids[0]).strip() == "Paris"
    assert batch.attention_mask[1, 0] == 0  # the short row is left-padded


def test_a_blank_answer_leaves_the_context_alone_at_the_end_of_its_row(real_lm):
    tok = real_lm.tokenizer
    batch = encode_pairs(tok, ["The capital of France is", "Bees make"], ["Paris", ""])
    context = tok("Bees make", add_special_tokens=False)["input_ids"]
    assert batch.answer_ids[1] == [] and batch.answer_start[1] == batch.input_ids.shape[1]
    assert batch.input_ids[1, -len(context) :].tolist() == context


def test_exact_match():
    assert exact_match(" Paris, France", "paris")
    assert not exact_match("Lyon", "Paris")
