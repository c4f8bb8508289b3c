"""SCEN routing on hand-made tensors: window features, first-token centring, start prototypes, the bank."""

import pytest
import torch
import torch.nn.functional as F

from editstream.errors import ArtifactError
from editstream.methods.scen.bank import PROTOTYPES, ExpertBank
from editstream.methods.scen.neuron import EarlierFacts, Neuron, prototype_neuron
from editstream.methods.scen.routing import Centers, Window, WindowSums, offsets, token_features, windows_at

D = 8


def test_window_sums_match_a_direct_mean_including_windows_cut_at_the_start():
    u = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    u[1, :2] = 0  # left padding of row 1
    sums = WindowSums(u, max_window=4)
    for length in range(1, 5):
        got = sums(length)
        for b in range(2):
            for t in range(5):
                want = F.normalize(u[b, max(0, t - length + 1) : t + 1].sum(0), dim=-1)
                assert torch.allclose(got[b, t], want, atol=1e-6)
    with pytest.raises(ValueError, match="window length 5"):
        sums(5)


def test_offsets_and_first_token_centring_under_left_padding():
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert offsets(mask).tolist() == [[0, 1, 2], [-1, 0, 1]]
    x = torch.randn(2, 3, D)
    centers = Centers(token=torch.randn(D), first=torch.randn(D))
    u = token_features(x, centers, mask)
    assert torch.allclose(u[0, 0], F.normalize(x[0, 0] - centers.first, dim=-1))  # a first token
    assert torch.allclose(u[1, 1], F.normalize(x[1, 1] - centers.first, dim=-1))  # first after padding
    assert torch.allclose(u[1, 2], F.normalize(x[1, 2] - centers.token, dim=-1))
    assert torch.equal(u[1, 0], torch.zeros(D))  # padding counts as nothing


def test_start_windows_are_read_only_where_a_texts_first_tokens_end():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    sums = WindowSums(torch.randn(2, 4, D) * mask[..., None], max_window=2)
    start = windows_at(sums, mask, Window(2, start=True))
    assert torch.allclose(start, torch.stack([sums(2)[0, 1], sums(2)[1, 3]]))
    assert len(windows_at(sums, mask, Window(2))) == 6  # an inside window: every real token


def _bank(capacity: int = 2) -> ExpertBank:
    mlp = torch.nn.Module()
    mlp.gate_proj = torch.nn.Linear(D, 16, bias=False)
    mlp.up_proj = torch.nn.Linear(D, 16, bias=False)
    mlp.down_proj = torch.nn.Linear(16, D, bias=False)
    return ExpertBank("narrow", mlp, 2, capacity, torch.device("cpu"), torch.float32)


def _add(bank: ExpertBank, edit_id: str, proto: torch.Tensor, window: Window, tau: float = 0.9) -> None:
    expert = {k: torch.zeros(v) for k, v in bank.shapes.items()}
    bank.add(edit_id, (proto * 20)[None], torch.tensor([-tau * 20]), [window], expert)


def test_bank_routes_each_row_on_its_own_and_start_prototypes_only_at_the_start():
    bank = _bank()
    a, b = torch.eye(D)[0], torch.eye(D)[1]
    _add(bank, "inside", a, Window(1))
    _add(bank, "start", b, Window(1, start=True))
    u = torch.zeros(3, 3, D)
    u[0, 2] = a  # row 0: a, late in the text -> "inside" fires there
    u[1, 0] = b  # row 1: b as the first token -> "start" fires
    u[2, 1] = b  # row 2: b, but not first -> nothing
    mask = torch.ones(3, 3, dtype=torch.long)
    slots, fires, peak = bank.route(WindowSums(u, 1), mask.bool(), offsets(mask))
    names = bank.slot_edit_ids()
    assert fires.tolist() == [True, True, False]
    assert [names[int(s)] for s in slots[:2]] == ["inside", "start"] and peak[:2].tolist() == [2, 0]


def test_bank_grows_and_a_removed_slot_never_fires_again():
    bank = _bank(capacity=1)
    protos = torch.eye(D)[:3]
    for i in range(3):
        _add(bank, f"e{i}", protos[i], Window(1))
    assert len(bank) == 3 and len(bank.bias) == 4 and bank.bias.shape[1] == PROTOTYPES
    bank.remove("e1")
    u = protos[1].reshape(1, 1, D)
    mask = torch.ones(1, 1, dtype=torch.long)
    _, fires, _ = bank.route(WindowSums(u, 1), mask.bool(), offsets(mask))
    assert not fires.item()
    with pytest.raises(ValueError, match="neuron of bad"):
        bank.add("bad", torch.zeros(3, D), torch.zeros(3), [Window(1)] * 3, {})


def test_prototype_threshold_sits_between_positives_and_negatives_above_the_floor():
    pos = F.normalize(torch.tensor([[1.0, 0.1, 0, 0, 0, 0, 0, 0], [1.0, -0.1, 0, 0, 0, 0, 0, 0]]), dim=-1)
    neg = F.normalize(torch.tensor([[0.6, 0.8, 0, 0, 0, 0, 0, 0]]), dim=-1)
    w, b = prototype_neuron(pos, neg, floor=0.5)
    assert ((pos @ w + b) > 0).all() and ((neg @ w + b) < 0).all()
    _, b_high = prototype_neuron(pos, neg, floor=0.9)
    assert -b_high / 20 == pytest.approx(0.9)


def test_earlier_facts_are_bounded_and_the_nearest_come_first():
    earlier = EarlierFacts(capacity=2)
    e = torch.eye(D)
    for i in range(3):
        earlier.remember(f"f{i}", e[i : i + 1])
    assert len(earlier) == 2  # f0 dropped
    assert torch.equal(earlier.nearest(e[2:3], exclude="x", k=1), e[2:3])
    assert len(earlier.nearest(e[2:3], exclude="f2", k=0)) == 1


def test_neuron_windows_in_an_artifact_are_checked():
    w, b = torch.zeros(2, D), torch.zeros(2)
    ok = [{"length": 2, "start": True}, {"length": 1, "start": False}]
    assert Neuron.from_tensors("e", w, b, ok, max_window=8).windows == [Window(2, True), Window(1)]
    for bad in (None, [], [{"length": 9, "start": False}] * 2, [{"length": 1}] * 2, ok[:1]):
        with pytest.raises(ArtifactError, match="artifact e"):
            Neuron.from_tensors("e", w, b, bad, max_window=8)
