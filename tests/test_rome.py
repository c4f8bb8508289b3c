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
