"""Every editing method on every model family users serve: Llama/SmolLM, Qwen2, Qwen3, Mistral,
Gemma and GPT-2, as tiny random models built from each family's config (shape and hook points;
what an edit does to answers is tested on the embedded model elsewhere)."""

from __future__ import annotations

import pytest
import torch

from editstream.bench.gpu import SHAPES
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.methods import create_method
from editstream.models import LoadedLM, model_fingerprint
from editstream.replica import Replica
from tests.conftest import params_hash

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"]
METHODS = ["recipe", "text-rag", "scen", "rome", "memit", "rledit"]
FACTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower", edit_id="eiffel"),
    EditRequest("Toyota Camry is produced by", "Honda", subject="Toyota Camry", edit_id="camry"),
]


def tiny_config(family: str, vocab: int):
    """A 2-layer config of `family` with 64-dim embeddings (the tiny RECIPE checkpoint's size)."""
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    common = {"vocab_size": vocab, **SHAPES["tiny"]}  # the GPU smoke run's shape too
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: tf.MistralConfig(**common),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
    }
    return configs[family]()


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request, real_lm) -> LoadedLM:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(request.param, len(real_lm.tokenizer))
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    name = f"tiny-{request.param}"
    return LoadedLM(model, real_lm.tokenizer, name, model_fingerprint(model, name))


def options(name: str, lm: LoadedLM, family: str, tiny_checkpoint, tiny_encoder, tmp_path) -> dict:
    if name == "rledit":  # untrained hypernetworks of this model's shapes (what they do is trained elsewhere)
        from editstream.methods.rledit.config import RLEditConfig
        from editstream.methods.rledit.method import new_hypernets, save_hypernets

        config = RLEditConfig(rank=8, init_lr=1.0)
        save_hypernets(new_hypernets(lm, config), config, tmp_path / "rledit", {"llm": lm.name})
        return {"checkpoint": str(tmp_path / "rledit")}
    if name in ("recipe", "text-rag"):
        return {"checkpoint": tiny_checkpoint, "encoder": tiny_encoder}
    if name in ("rome", "memit"):
        return {"mom2_samples": 256, "steps": 3}
    if name == "scen":  # GPT-2's FFN has no gate for a low-rank expert: the narrow expert instead
        return {"expert_steps": 3, "neuron_steps": 20, **({"expert": "narrow"} if family == "gpt2" else {})}
    return {}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_edits_every_family(family_lm, name, tiny_checkpoint, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSTREAM_CACHE", str(tmp_path))  # key statistics of this tiny model: not kept
    chosen = options(name, family_lm, family_lm.name[5:], tiny_checkpoint, tiny_encoder, tmp_path)
    method = create_method(name, family_lm, **chosen)
    replica = Replica(method)
    before = params_hash(family_lm.model)
    weights = {n: p.detach().clone() for n, p in family_lm.model.named_parameters()}
    try:
        artifacts = method.compute(FACTS)
        assert [a.edit_id for a in artifacts] == ["eiffel", "camry"]
        assert params_hash(family_lm.model) == before, f"{name} compute changed the {family_lm.name} weights"
        for seq, a in enumerate(artifacts, start=1):
            replica.apply(seq, a)
        answers = replica.generate([f.prompt for f in FACTS] + ["Bees make"], 4)
        answers += replica.generate([FACTS[0].prompt], 4, chat=True)
        assert all(a.completion_tokens > 0 for a in answers)
        if name in ("rome", "memit", "rledit"):
            assert params_hash(family_lm.model) != before, f"{name} left the {family_lm.name} weights as they were"
        else:  # a retrieved prompt or a routed expert: the edit is found for its own prompt
            assert [answers[i].fired for i in (0, 1)] == ["eiffel", "camry"]
        if name in ("recipe", "text-rag"):  # looked up on the prompt's text, so as a chat turn too (SCEN
            assert answers[3].fired == "eiffel"  # reads hidden states, which a random model's template moves)
        for seq, a in enumerate(reversed(artifacts), start=len(artifacts) + 1):
            replica.retract(seq, a.edit_id)
        assert method.edit_ids() == []
        for n, p in family_lm.model.named_parameters():  # removal restores the weights (up to rounding)
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-5, msg=f"{name} on {family_lm.name}: {n}")
    finally:
        method.reset()
        with torch.no_grad():  # the next method starts from the same weights
            for n, p in family_lm.model.named_parameters():
                p.copy_(weights[n])


def test_a_recipe_checkpoint_for_another_embedding_size_is_refused_at_start(real_lm, tiny_checkpoint, tiny_encoder):
    with pytest.raises(ConfigError, match="64-dim prompts; model .* embeds in 576"):
        create_method("recipe", real_lm, checkpoint=tiny_checkpoint, encoder=tiny_encoder)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_edits_a_bfloat16_model(real_lm, name, tiny_checkpoint, tiny_encoder, tmp_path, monkeypatch):
    """Models are served in bf16 on GPUs: edits are solved in float32 and applied in the weights' dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(real_lm.tokenizer)), dtype=torch.bfloat16)
    lm = LoadedLM(model.eval().requires_grad_(False), real_lm.tokenizer, "tiny-llama-bf16", "bf16")
    monkeypatch.setenv("EDITSTREAM_CACHE", str(tmp_path))
    method = create_method(name, lm, **options(name, lm, "llama", tiny_checkpoint, tiny_encoder, tmp_path))
    replica = Replica(method)
    before = params_hash(model)
    for seq, a in enumerate(method.compute(FACTS), start=1):
        replica.apply(seq, a)
    answers = replica.generate([f.prompt for f in FACTS], 4)
    assert all(a.completion_tokens > 0 for a in answers)
    if name in ("rome", "memit", "rledit"):
        assert params_hash(model) != before and next(model.parameters()).dtype == torch.bfloat16
    else:
        assert [a.fired for a in answers] == ["eiffel", "camry"]
    method.reset()
