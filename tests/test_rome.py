"""ROME and MEMIT on the embedded model: the edit takes, removal restores the weights, statistics cache."""

from __future__ import annotations

import pytest
import torch

from editstream.edits import EditRequest
from editstream.methods import create_method
from editstream.methods.rome.stats import second_moments
from editstream.replica import Replica
from tests.conftest import params_hash

SAMPLES = 4096  # corpus tokens for the key statistics: enough for the tests, fast on a CPU

FACTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower", edit_id="eiffel"),
    EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux", edit_id="dd"),
    EditRequest("Toyota Camry is produced by", "Honda", subject="Toyota Camry", edit_id="camry"),
]


def argmax_matches(replica: Replica, fact: EditRequest) -> bool:
    preds, ids, _ = replica.predict([fact.prompt], [fact.target])
    return preds[0] == ids[0]


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_edit_becomes_the_argmax_and_removal_restores_the_weights(real_lm, name):
    method = create_method(name, real_lm, mom2_samples=SAMPLES)
    replica = Replica(method)
    originals = {n: method.lm.model.get_parameter(n).detach().clone() for n in method.params}
    before = params_hash(real_lm.model)
    facts = FACTS[:1] if name == "rome" else FACTS
    try:
        assert not any(argmax_matches(replica, f) for f in facts)
        artifacts = method.compute(facts)  # MEMIT: the three solved jointly
        assert params_hash(real_lm.model) == before, "compute changed the model"
        assert all(a.tensors["u"].shape[0] == len(method.layers) for a in artifacts)
        for seq, a in enumerate(artifacts, start=1):
            replica.apply(seq, a)
        assert all(argmax_matches(replica, f) for f in facts), f"{name}: an edit did not take"
        (answer,) = replica.generate([facts[0].prompt], max_new_tokens=3)
        assert answer.text.strip().startswith(facts[0].target)
        for seq, a in enumerate(reversed(artifacts), start=len(artifacts) + 1):
            replica.retract(seq, a.edit_id)
        for n, w in originals.items():
            torch.testing.assert_close(method.lm.model.get_parameter(n), w, rtol=0, atol=1e-5)
        assert not any(argmax_matches(replica, f) for f in facts)
    finally:
        method.reset()
        for n, w in originals.items():  # leave the shared model exactly as it was for later tests
            with torch.no_grad():
                method.lm.model.get_parameter(n).copy_(w)


def test_key_statistics_are_cached_per_model_layer_and_sample(real_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSTREAM_CACHE", str(tmp_path))
    first = second_moments(real_lm, [2, 3], sample_size=1024)
    files = sorted(p.name for p in (tmp_path / "rome-stats").iterdir())
    assert len(files) == 2 and all("-n1024" in f for f in files)
    again = second_moments(real_lm, [3], sample_size=1024)
    assert torch.equal(again[3], first[3])
    c = first[2]
    assert c.shape == (1536, 1536) and torch.allclose(c, c.T) and bool((c.diagonal() >= 0).all())


def test_rome_on_a_gpt2_family_model(real_lm):
    """GPT-2's MLP output matrix is a Conv1D (weight (in, out)): the change is laid out transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from editstream.models import LoadedLM

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(real_lm.tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=256)
    lm = LoadedLM(GPT2LMHeadModel(config).eval().requires_grad_(False), real_lm.tokenizer, "tiny-gpt2", "tiny-gpt2-fp")
    method = create_method("rome", lm, mom2_samples=1024, layers=[1], steps=30)
    weight = lm.model.transformer.h[1].mlp.c_proj.weight
    original = weight.detach().clone()
    (artifact,) = method.compute(FACTS[:1])
    assert torch.equal(weight, original)
    module = lm.model.transformer.h[1].mlp.c_proj
    key = method._keys(1, [FACTS[0].prompt], FACTS[0].subject)
    before = module(key)
    replica = Replica(method)
    replica.apply(1, artifact)
    change = weight.detach() - original
    assert change.shape == (256, 64) and torch.linalg.matrix_rank(change).item() == 1
    # ROME's defining property, W' k* = v*: at the fact's key the output moves by exactly u
    # (a random model cannot be made to say "Rome"; the embedded one is tested above)
    torch.testing.assert_close(module(key) - before, artifact.tensors["u"][0], rtol=1e-3, atol=1e-5)
    replica.retract(2, artifact.edit_id)
    torch.testing.assert_close(weight.detach(), original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [2, 3, 6, 12, 30])
def test_memit_never_edits_the_last_layer(depth):
    """MEMIT optimises the target hidden state at its top layer's output, which reaches the answer
    only through a layer above it: its default band ends below the last layer at every depth, and
    keeps the published band (five layers ending at n // 6 + 1) where there is room."""
    from editstream.methods.rome.method import Memit

    layers = Memit.default_layers(None, depth)
    assert layers and max(layers) <= depth - 2 and min(layers) >= 0
    if depth >= 12:
        top = depth // 6 + 1
        assert layers == list(range(max(0, top - 4), top + 1))
