"""The method contract, for every registered method, on tiny models."""

import pytest

from editstream.artifacts import Artifact
from editstream.edits import EditRequest
from editstream.errors import ArtifactError, ConfigError, OrderError, UnknownMethodError
from editstream.methods import METHODS, create_method
from editstream.packs import write_state
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


@pytest.mark.parametrize("method_name", ["recipe", "rome"])
def test_a_saved_state_loads_in_bulk_to_the_state_that_applying_one_by_one_leaves(
    method_name, tiny_lm, tiny_encoder, tiny_checkpoint, tmp_path
):
    import torch

    options = {"checkpoint": tiny_checkpoint, "encoder": tiny_encoder} if method_name == "recipe" else {}
    options = options or {"mom2_samples": 2000}
    method = create_method(method_name, tiny_lm, **options)
    weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    newer = EditRequest("The capital of France is", "Nice", edit_id="a2")  # supersedes "a"
    arts = method.compute(EDITS) + method.compute([newer])
    for a in arts:
        method.apply(a)
    digest, answers = method.digest(), Replica(method).generate([e.prompt for e in EDITS], max_new_tokens=3)
    method.save_state(tmp_path / "state")
    method.reset()
    method.load_state(tmp_path / "state")
    assert method.digest() == digest and method.is_active("a2") and not method.is_active("a")
    assert Replica(method).generate([e.prompt for e in EDITS], max_new_tokens=3) == answers
    method.remove("a2")  # the superseded edit comes back, as after one-by-one applies
    assert method.is_active("a")
    method.reset()
    for name, value in tiny_lm.model.state_dict().items():
        assert torch.allclose(value, weights[name], atol=1e-5), name
    if method_name != "recipe":
        return
    # a state with an artifact this method cannot attach is refused whole: no edit stays applied
    bad = arts[1]
    tensors = {**bad.tensors, "encoding": bad.tensors["encoding"][:1]}
    broken = Artifact(bad.method, "bad", bad.base_fingerprint, tensors, {**bad.meta, "prompt": "Broken"})
    write_state(tmp_path / "broken", method_name, tiny_lm.fingerprint, [arts[0], broken])
    with pytest.raises(ConfigError, match="artifact bad: encoding"):
        method.load_state(tmp_path / "broken")
    assert method.edit_ids() == [] and len(method.retrieval.index) == 0
