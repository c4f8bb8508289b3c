"""Greedy decoding drops finished rows from the batch without changing any row's text, with a soft
prefix hook in effect (RECIPE) and without; the cut stops a row at its first '.' or newline."""

from __future__ import annotations

from editstream import wild
from editstream.demo_facts import demo_facts
from editstream.generation import greedy
from editstream.methods import create_method
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
