"""A short RECIPE training run lowers the loss and resumes from its checkpoint."""

import json

import pytest

from editstream.data import load_edits
from editstream.methods.recipe.checkpoint import load_checkpoint
from editstream.methods.recipe.config import RecipeConfig, TrainConfig
from editstream.methods.recipe.train import Trainer, generator_loss, retriever_loss, validate


@pytest.mark.parametrize("wild", [False, True], ids=["target-only", "continuation+negatives+chat"])
def test_training_lowers_losses_and_resumes(tmp_path, tiny_lm, tiny_encoder, wild):
    edits = load_edits("counterfact-train", limit=80) + (load_edits("zsre-train", limit=40) if wild else [])
    config = RecipeConfig(
        encoder="tiny-bert",
        key_dim=16,
        retriever_hidden=32,
        prompt_len=3,
        generator_hidden=64,
        target_slots=2,
        end_slots=2 if wild else 0,
    )
    schedule = TrainConfig(
        continuation_weight=1.0 if wild else 0.0,
        continuation_tokens=4,
        subject_negatives=wild,
        chat_form=wild,
        retriever_steps=60,
        retriever_batch=32,
        generator_steps=30,
        generator_batch=8,
        generator_lr=3e-3,
        validate_every=30,
        checkpoint_every=10,
        validation_rows=16,
    )
    trainer = Trainer(tiny_lm, tiny_encoder, edits, tmp_path, config, schedule)
    fixed = trainer.train.subset(range(16))

    def losses():
        r, _ = retriever_loss(trainer.net, fixed.r_prompt, fixed.r_para, fixed.r_loc, fixed.r_neg)
        g, _ = generator_loss(trainer.net, tiny_lm, fixed, schedule)
        return r.item(), g.item()

    r0, g0 = losses()
    trainer.run()
    r1, g1 = losses()
    assert r1 < r0 and g1 < g0
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert state["generator_step"] == 30 and state["history"]
    last = state["history"][-1]
    assert 0.0 <= last["wild_reliability"] <= 1.0 and ("retrieval_neg_reject" in last) == wild
    assert ("wild_chat_reliability" in last) == wild  # question rows are scored in chat form too
    several = validate(trainer.net, tiny_lm, trainer.val, batch=5, wild_tokens=4)  # rows in several batches
    assert set(several) == set(last) - {"step", "seconds", "ce", "acc", "cont_kl"}
    net, meta = load_checkpoint(tmp_path)
    assert meta["steps"]["generator_step"] == 30

    again = Trainer(tiny_lm, tiny_encoder, edits, tmp_path, config, schedule)  # resumes: nothing left to do
    assert again.state["generator_step"] == 30 and again.state["retriever_step"] == 60
