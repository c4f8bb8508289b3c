"""RLEdit: the ridge solve, removable per-edit factors, the trajectory training (tiny random models;
what a trained hypernetwork does to answers needs `editstream train rledit`, not run in the suite)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from editstream.demo_facts import demo_facts
from editstream.edits import LocalityProbe
from editstream.errors import ConfigError
from editstream.methods import create_method
from editstream.methods.rledit.below import BelowBand
from editstream.methods.rledit.config import RLEditConfig, TrainConfig
from editstream.methods.rledit.hypernet import ridge_factors
from editstream.methods.rledit.method import new_hypernets, save_hypernets
from editstream.methods.rledit.null_space import projection
from editstream.methods.rledit.train import RLEditTrainer, pairs_loss
from editstream.methods.rome.stats import second_moments
from editstream.methods.scen.layers import decoder_layers
from editstream.replica import Replica
from tests.conftest import params_hash


def test_the_ridge_solve_in_key_space_equals_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 20, generator=gen), torch.randn(7, 5, generator=gen)
    lam = torch.tensor(0.3)
    closed = torch.linalg.solve(u.T @ u + lam.exp() * torch.eye(20), u.T @ v)  # (d_in, d_out)
    torch.testing.assert_close(u.T @ ridge_factors(u, v, lam), closed, rtol=1e-4, atol=1e-5)


@pytest.fixture
def rledit(tiny_lm, tmp_path):
    config = RLEditConfig(rank=16, batch=3, init_lr=1.0)
    save_hypernets(new_hypernets(tiny_lm, config), config, tmp_path, {"llm": tiny_lm.name})
    return create_method("rledit", tiny_lm, checkpoint=str(tmp_path))


def test_compute_leaves_the_model_alone_and_remove_restores_it(tiny_lm, rledit):
    facts = demo_facts(5)
    before = params_hash(tiny_lm.model)
    weights = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    artifacts = rledit.compute(facts)  # two batches: the second solved on the model the first changed
    assert [a.edit_id for a in artifacts] == [f.edit_id for f in facts]
    assert params_hash(tiny_lm.model) == before
    assert artifacts[0].meta["modules"] == rledit.names and artifacts[0].tensors["u0"].dtype == torch.float16
    replica = Replica(rledit)
    for seq, a in enumerate(artifacts, start=1):
        replica.apply(seq, a)
    assert params_hash(tiny_lm.model) != before
    for seq, a in enumerate(artifacts, start=6):
        replica.retract(seq, a.edit_id)
    for n, p in tiny_lm.model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-5, msg=n)


def test_a_missing_hypernetwork_is_refused_with_the_command_that_makes_one(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="editstream train rledit"):
        create_method("rledit", tiny_lm, checkpoint=str(tmp_path / "none"))


def demo_trainer(tiny_lm, out, **schedule) -> RLEditTrainer:
    """A trainer on 60 demo facts (one locality probe each), trajectories of 3 batches of 4."""
    probe = (LocalityProbe("Bees make", "honey"),)
    edits = [dataclasses.replace(e, locality=probe) for e in demo_facts(60)]
    schedule = {"trajectories": 1, "trajectory": 3, "batch": 4, "backtrack": 2, "validation_edits": 8, **schedule}
    return RLEditTrainer(tiny_lm, edits, out, RLEditConfig(rank=16, batch=4), TrainConfig(**schedule))


def test_one_training_step_lowers_the_trajectory_loss(tiny_lm, tmp_path):
    trainer = demo_trainer(tiny_lm, tmp_path, lr=3e-2)
    weights = params_hash(tiny_lm.model)
    before = trainer.trajectory(random.Random(5), learn=False)
    for _ in range(3):
        trainer.trajectory(random.Random(5))
    after = trainer.trajectory(random.Random(5), learn=False)
    assert params_hash(tiny_lm.model) == weights  # every trajectory restores the weights
    assert after["edit"] < before["edit"], (before, after)
    state = trainer.run()  # one trajectory, validated and exported, resumable
    best = state["best"]
    assert state["trajectory"] == 1 and 0 <= best["locality"] <= 1 and best["score"] >= 0, best
    assert (tmp_path / "rledit.json").is_file() and (tmp_path / "train_state.json").is_file()
    assert create_method("rledit", tiny_lm, checkpoint=str(tmp_path)).names == trainer.names


def test_batch_updates_step_after_every_batch_and_lower_the_loss(tiny_lm, tmp_path):
    trainer = demo_trainer(tiny_lm, tmp_path, lr=3e-2, update="batch")
    before = trainer.trajectory(random.Random(5), learn=False)
    assert trainer.updates == 0
    trainer.trajectory(random.Random(5))
    assert trainer.updates == 3  # one per batch, none at the trajectory's end
    after = trainer.trajectory(random.Random(5), learn=False)
    assert after["edit"] < before["edit"], (before, after)
    with pytest.raises(ValueError, match="'step'"):
        TrainConfig(update="step")


def test_below_band_skips_the_layers_below_for_a_seen_input_and_changes_nothing(tiny_lm):
    edits = demo_facts(4)
    layers = decoder_layers(tiny_lm.model)
    calls = []
    counter = layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = pairs_loss(tiny_lm, edits)
        with BelowBand(tiny_lm.model, start=1) as below:
            first = pairs_loss(tiny_lm, edits)
            calls.clear()
            again = pairs_loss(tiny_lm, edits)
            assert not calls  # layer 0 never ran for the inputs seen
            assert (below.hits, below.misses) == (2, 2)  # the prompts' batch and the paraphrases' batch
        pairs_loss(tiny_lm, edits)
        assert calls  # removed: layer 0 runs again
    finally:
        counter.remove()
    assert decoder_layers(tiny_lm.model) is layers
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)


def test_a_trajectory_scores_the_same_with_and_without_the_layers_below_cached(tiny_lm, tmp_path):
    trainer = demo_trainer(tiny_lm, tmp_path)
    nets = {k: v.clone() for k, v in trainer.nets.state_dict().items()}  # its running norms move in a trajectory
    cached = trainer.trajectory(random.Random(3), learn=False)
    hits, misses = trainer.cache_counts
    assert hits >= 3 * 2 and misses > 0, trainer.cache_counts  # every step: the batch's prompts and locality again
    trainer.schedule = dataclasses.replace(trainer.schedule, cache_below=False)
    trainer.nets.load_state_dict(nets)
    plain = trainer.trajectory(random.Random(3), learn=False)
    assert cached.keys() == plain.keys()
    for key in cached:
        assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key


def test_the_null_space_projection_keeps_only_the_directions_text_hardly_uses():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=gen))[0]
    scales = torch.tensor([3.0] * 8 + [0.01] * 4)  # 8 directions in use, 4 hardly used
    x = (torch.randn(4000, 12, generator=gen) * scales) @ basis.T
    p = projection(x.T @ x / len(x), threshold=0.05)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    assert round(float(p.trace())) == 4
    torch.testing.assert_close(basis[:, :8].T @ p, torch.zeros(8, 12), atol=1e-3, rtol=0)  # used: removed
    torch.testing.assert_close(basis[:, 8:].T @ p, basis[:, 8:].T, atol=1e-3, rtol=0)  # unused: kept
    with pytest.raises(ValueError, match="-0.1"):
        RLEditConfig(null_space=-0.1)


def corpus_energy(tiny_lm, null_space: float, tmp_path, bound_at: float = 0.5) -> tuple[float, float]:
    """(E[|x dW|^2] on the corpus, the bound `bound_at` x mean eigenvalue x |dW|^2 that a projection at
    that threshold guarantees) for the shift that 5 edits put into the edited layer's up_proj,
    measured from the weights a replica changed. (A random tiny model uses its input directions
    evenly: none is below 0.05 of the mean, as the real model's are; 0.5 keeps some.)"""
    config = RLEditConfig(rank=16, batch=5, init_lr=1.0, null_space=null_space, null_space_tokens=2048)
    save_hypernets(new_hypernets(tiny_lm, config), config, tmp_path, {"llm": tiny_lm.name})
    method = create_method("rledit", tiny_lm, checkpoint=str(tmp_path))
    module = decoder_layers(tiny_lm.model)[1].mlp.up_proj
    before = module.weight.detach().clone()
    replica = Replica(method)
    artifacts = method.compute(demo_facts(5))
    for seq, a in enumerate(artifacts, start=1):
        replica.apply(seq, a)
    change = module.weight.detach() - before  # (out, in): x -> x change^T
    for seq, a in enumerate(artifacts, start=6):
        replica.retract(seq, a.edit_id)
    mom2 = second_moments(tiny_lm, [1], config.null_space_corpus, 2048, site="mlp")[1]
    energy = float(torch.trace(change @ mom2 @ change.T))
    bound = bound_at * float(torch.linalg.eigvalsh(mom2).mean()) * float((change**2).sum())
    return energy, bound


def test_null_space_shifts_leave_ordinary_text_nearly_alone(tiny_lm, tmp_path):
    energy, bound = corpus_energy(tiny_lm, 0.5, tmp_path / "projected")
    assert 0 < energy <= bound, (energy, bound)
    energy, bound = corpus_energy(tiny_lm, 0.0, tmp_path / "plain")
    assert energy > bound, (energy, bound)  # without the projection the same edits reach ordinary text
    with pytest.raises(ConfigError, match="raise null_space"):  # nothing below 0.01 of the mean here
        corpus_energy(tiny_lm, 0.01, tmp_path / "empty")
