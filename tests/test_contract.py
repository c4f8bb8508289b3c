"""The method contract, for every registered method, on tiny models."""

import pytest

from editstream.edits import EditRequest
from editstream.errors import ArtifactError, OrderError, UnknownMethodError
from editstream.methods import METHODS, create_method
from editstream.replica import Replica
from tests.conftest import params_hash

EDITS = [
    EditRequest("The capital of France is", "Lyon", edit_id="a"),
    EditRequest("The sky is", "green", edit_id="b"),
    EditRequest("Bees make", "glue", edit_id="c"),
]


@pytest.fixture(params=sorted(METHODS))
def method(request, tiny_lm, tiny_encoder, tiny_checkpoint, tiny_hypernets):
    options = {
        "recipe": {"checkpoint": tiny_checkpoint, "encoder": tiny_encoder},
        "text-rag": {"checkpoint": tiny_checkpoint, "encoder": tiny_encoder},
        "rledit": {"checkpoint": str(tiny_hypernets)},
    }.get(request.param, {})
    method = create_method(request.param, tiny_lm, **options)
    yield method
    method.reset()  # weight-editing methods changed the shared tiny model: undo


def test_compute_never_mutates_the_model_or_the_edit_state(method):
    method.apply(method.compute(EDITS[:1])[0])
    before = params_hash(method.lm.model)
    digest = method.digest()
    artifacts = method.compute(EDITS)
    assert params_hash(method.lm.model) == before
    assert method.digest() == digest and method.edit_ids() == ["a"]
    assert [a.edit_id for a in artifacts] == ["a", "b", "c"]


def test_apply_remove_save_load(method, tmp_path):
    for a in method.compute(EDITS):
        assert method.apply(a)
    assert not method.apply(method.compute(EDITS[:1])[0])  # idempotent
    digest = method.digest()
    method.save_state(tmp_path / "state")
    assert method.remove("b") and not method.remove("b")
    assert method.edit_ids() == ["a", "c"]
    method.load_state(tmp_path / "state")
    assert method.digest() == digest and method.edit_ids() == ["a", "b", "c"]
    method.reset()
    assert method.edit_ids() == []


def test_supersede_then_retract_restores_the_older_edit(method):
    old = EditRequest("The sky is", "green", edit_id="old")
    new = EditRequest("the sky   IS", "purple", edit_id="new")  # same prompt after normalisation
    a_old, a_new = method.compute([old, new])
    method.apply(a_old)
    method.apply(a_new)
    assert method.active_edit_ids() == ["new"]
    assert method.is_active("new") and not method.is_active("old")  # evaluators probe only "new"
    method.remove("new")
    assert method.active_edit_ids() == ["old"] and method.is_active("old") and not method.is_active("new")
    method.remove("old")
    assert method.active_edit_ids() == [] and not method.is_active("old")


def test_artifact_for_another_model_or_method_is_refused(method):
    art = method.compute(EDITS[:1])[0]
    art.base_fingerprint = "someone-else"
    with pytest.raises(ArtifactError, match="base model"):
        method.apply(art)
    art = method.compute(EDITS[:1])[0]
    art.method = "other"
    with pytest.raises(ArtifactError, match="method"):
        method.apply(art)


def test_unknown_method_lists_registered():
    with pytest.raises(UnknownMethodError, match="recipe"):
        create_method("nope", None)


def test_replica_applies_in_seq_order_only(tiny_lm):
    replica = Replica(create_method("none", tiny_lm))
    arts = replica.method.compute(EDITS)
    assert replica.apply(1, arts[0])
    assert not replica.apply(1, arts[0])  # replay of an applied seq
    with pytest.raises(OrderError, match="expected 2"):
        replica.apply(3, arts[2])
    assert replica.apply(2, arts[1]) and replica.version == 2
    assert replica.retract(3, "a") and replica.method.edit_ids() == ["b"]


def test_recipe_artifacts_hold_a_float16_key_and_encoding_and_the_target_ids(tiny_lm, tiny_encoder, tiny_checkpoint):
    import torch

    method = create_method("recipe", tiny_lm, checkpoint=tiny_checkpoint, encoder=tiny_encoder)
    art = method.compute([EditRequest("The sky is", "green and blue", edit_id="x")])[0]
    assert art.tensors["key"].dtype == art.tensors["encoding"].dtype == torch.float16
    assert "prompt" not in art.tensors  # generated from the encoding when the edit fires
    ids = art.tensors["target_ids"]
    assert ids.dtype == torch.int32 and ids.shape == (2,)
    assert ids.tolist() == tiny_lm.tokenizer(" green and blue", add_special_tokens=False)["input_ids"][:2]


def test_recipe_prefix_hook_is_removed_after_the_query(tiny_lm, tiny_encoder, tiny_checkpoint):
    method = create_method("recipe", tiny_lm, checkpoint=tiny_checkpoint, encoder=tiny_encoder)
    method.apply(method.compute(EDITS[:1])[0])
    replica = Replica(method)
    (answer,) = replica.generate(["The capital of France is"], max_new_tokens=3)
    assert answer.fired == "a"
    assert not tiny_lm.model._forward_pre_hooks


def test_ft_apply_changes_weights_and_remove_restores_them(tiny_lm):
    import torch

    method = create_method("ft", tiny_lm, steps=3, lr=1e-2)
    before = method.weight.detach().clone()
    (art,) = method.compute(EDITS[:1])
    method.apply(art)
    assert not torch.allclose(method.weight, before)
    method.remove("a")
    assert torch.allclose(method.weight, before, atol=1e-6)


def test_ft_rejects_unknown_options(tiny_lm):
    from editstream.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown keys"):
        create_method("ft", tiny_lm, learning_rate=1)
