"""The sentence encoder on ONNX Runtime gives torch's embeddings, and its graph cache holds up."""

from __future__ import annotations

import pytest
import torch

from editstream import encoder_onnx
from editstream.errors import ConfigError
from editstream.models import load_encoder

TEXTS = [
    "The capital of France is",
    "x",
    "Which river flows through the city where the author of the novel was born, and how long is it?",
    "The Eiffel Tower is located in the city of",
    "what " * 100,  # truncated at max_length on both paths
    "Danielle Darrieux's mother tongue is",
]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple:
    cache = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITSTREAM_CACHE", str(cache))
        return load_encoder(device="cpu", runtime="torch"), load_encoder(device="cpu", runtime="onnx"), cache


def test_onnx_embeddings_equal_torch_in_any_batch_and_order(encoders) -> None:
    torch_enc, onnx_enc, _ = encoders
    assert (torch_enc.runtime, onnx_enc.runtime) == ("torch", "onnx")
    reference = torch.cat([torch_enc.encode([t]) for t in TEXTS])  # each alone: no padding at all
    for enc in (torch_enc, onnx_enc):
        for batch_size in (1, 2, 32):
            got = enc.encode(TEXTS, batch_size=batch_size)
            assert got.shape == (len(TEXTS), 384)
            assert (got - reference).abs().max() < 1e-5, (enc.runtime, batch_size)
    assert onnx_enc.encode([]).shape == (0, 384)


def test_the_exported_graph_is_reused_and_a_damaged_one_exported_again(encoders, monkeypatch) -> None:
    torch_enc, _, cache = encoders
    monkeypatch.setenv("EDITSTREAM_CACHE", str(cache))
    graphs = list((cache / "onnx").glob("*.onnx"))
    assert len(graphs) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cached graph is intact")

    monkeypatch.setattr(encoder_onnx, "_export", no_export)
    again = load_encoder(device="cpu", runtime="onnx")
    assert (again.encode(TEXTS[:2]) - torch_enc.encode(TEXTS[:2])).abs().max() < 1e-5

    monkeypatch.undo()
    monkeypatch.setenv("EDITSTREAM_CACHE", str(cache))
    graphs[0].write_bytes(b"not an onnx graph")
    repaired = load_encoder(device="cpu", runtime="onnx")
    assert (repaired.encode(TEXTS[:2]) - torch_enc.encode(TEXTS[:2])).abs().max() < 1e-5
    assert graphs[0].stat().st_size > 1_000_000
    assert not list((cache / "onnx").glob("*.tmp"))  # exports are written atomically


def test_a_bad_runtime_is_named(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="'tensorrt'"):
        load_encoder(device="cpu", runtime="tensorrt")
    monkeypatch.setenv("EDITSTREAM_ENCODER_RUNTIME", "bogus")
    with pytest.raises(ConfigError, match="'bogus'"):
        load_encoder(device="cpu")


def test_the_int8_graph_keeps_embeddings_close_and_has_its_own_name(encoders, monkeypatch) -> None:
    torch_enc, _, cache = encoders
    monkeypatch.setenv("EDITSTREAM_CACHE", str(cache))
    int8 = load_encoder(device="cpu", runtime="onnx", int8=True)
    per_tensor = load_encoder(device="cpu", runtime="torch", int8=True)
    assert (int8.name, int8.runtime, per_tensor.name) == ("minilm+int8-ort", "onnx", "minilm+int8")
    assert len(list((cache / "onnx").glob("*-int8pc.onnx"))) == 1  # quantised once, beside the float graph
    reference = torch_enc.encode(TEXTS)
    cosine = (int8.encode(TEXTS) * reference).sum(-1)
    assert cosine.min() > 0.97, cosine
    alone = torch.cat([int8.encode([t]) for t in TEXTS])  # activations share a scale per batch: close, not equal
    assert ((alone * int8.encode(TEXTS, batch_size=32)).sum(-1) > 0.97).all()  # 0.977 measured: "x" beside 64 tokens
    assert cosine.min() < 0.99999  # it is another encoder, not the float graph under a new name
