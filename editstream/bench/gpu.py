"""GPU numbers with nothing downloaded: a randomly initialised model of a real shape, timed.

Throughput does not depend on the weights, so the served model is built from a config (Llama-3-8B's
shape in bfloat16 by default; `--smoke`: a 64-dim model on the CPU, to prove the script runs), the
sentence encoder is MiniLM's shape with random weights, and RECIPE's network is untrained (its
query and key heads start equal, so a prompt still finds its own edit). What is timed:

* query latency, one prompt at a time, greedy `new_tokens`: unedited vs RECIPE with each count of
  stored edits (paraphrase probes, never stored prompts, so the key search runs every time; the
  stored prompts' exact-prompt fast path beside it) and vs SCEN with `scen_stored` experts;
* edit compute time and replica apply time per method: RECIPE, SCEN and ROME one edit at a time,
  MEMIT and RLEdit in batches of 20 (RLEdit with untrained hypernetworks: cost does not depend on
  their weights);
* tokens/s for one batch of `chat_batch` chat requests, unedited and with RECIPE's edits stored.

Stored edits past the real ones are copies of real artifacts with random routing keys
(`editstream.bench.cost.fill`): a flat index's and a neuron bank's cost do not depend on the values.
Each part that fails is recorded with its error and the rest still runs (one GPU lease, one try).
Tokenizers come from the installed embedded models, or from `assets` (made here by `--save-assets`
on a machine that has them, and carried to one that does not).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from editstream.bench import cost
from editstream.demo_facts import demo_facts
from editstream.edits import EditRequest
from editstream.methods import create_method
from editstream.models import LoadedEncoder, LoadedLM, model_fingerprint
from editstream.replica import Replica

log = logging.getLogger(__name__)

LLM_TOKENIZER, ENCODER_TOKENIZER = "llm-tokenizer", "encoder-tokenizer"

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {  # Meta-Llama-3-8B's config.json, except the vocabulary (the embedded tokenizer's)
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}
ENCODERS = {  # all-MiniLM-L6-v2's shape, and a 1-layer one for the smoke run
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
}


@dataclass
class GpuBenchConfig:
    """What one run measures; the defaults are the full GPU run, `smoke()` the CPU proof."""

    shape: str = "llama3-8b"
    encoder: str = "minilm"
    device: str = "cuda"
    dtype: str = "bfloat16"
    stored: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    scen_stored: int = 1000
    real_edits: int = 64
    probes: int = 16
    rounds: int = 3
    new_tokens: int = 16
    edit_samples: int = 4
    chat_batch: int = 32
    chat_tokens: int = 64
    budget_s: float = 480.0  # parts that would start later are skipped (a 10-minute device call)
    methods: list[str] = field(default_factory=lambda: ["recipe", "scen", "rome", "memit", "rledit"])
    batch: int = 20  # MEMIT and RLEdit: edits solved together

    @classmethod
    def smoke(cls) -> GpuBenchConfig:
        return cls(
            shape="tiny", encoder="tiny", device="cpu", dtype="float32", stored=[200, 1000], scen_stored=50,
            real_edits=16, probes=4, rounds=1, new_tokens=4, edit_samples=2, chat_batch=4, chat_tokens=8, batch=4,
        )  # fmt: skip


def load_tokenizers(assets: Path | None) -> tuple[Any, Any]:
    """The served model's and the encoder's tokenizers: from `assets` if given, else the embedded ones."""
    from transformers import AutoTokenizer

    if assets is not None:
        llm_src, enc_src = str(assets / LLM_TOKENIZER), str(assets / ENCODER_TOKENIZER)
    else:
        from editstream.models import _embedded_llm_cache, embedded_encoder_path

        llm_src, enc_src = str(_embedded_llm_cache()), str(embedded_encoder_path())
    llm_tok = AutoTokenizer.from_pretrained(llm_src, local_files_only=True)
    enc_tok = AutoTokenizer.from_pretrained(enc_src, local_files_only=True)
    if llm_tok.pad_token is None:
        llm_tok.pad_token = llm_tok.eos_token
    llm_tok.padding_side = "left"
    return llm_tok, enc_tok


def save_assets(directory: Path) -> None:
    """Write both embedded tokenizers under `directory` (a few MB), to carry to a machine without them."""
    llm_tok, enc_tok = load_tokenizers(None)
    llm_tok.save_pretrained(str(directory / LLM_TOKENIZER))
    enc_tok.save_pretrained(str(directory / ENCODER_TOKENIZER))


def random_lm(config: GpuBenchConfig, tokenizer: Any) -> LoadedLM:
    """A Llama-architecture model of `config.shape`, random weights, built on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, config.dtype)
    shape = LlamaConfig(vocab_size=len(tokenizer), **SHAPES[config.shape])
    torch.manual_seed(0)
    with torch.device(config.device):
        model = AutoModelForCausalLM.from_config(shape, dtype=dtype)
    model.eval().requires_grad_(False)
    name = f"random-{config.shape}"
    return LoadedLM(model, tokenizer, name, model_fingerprint(model, name))


def random_encoder(config: GpuBenchConfig, tokenizer: Any) -> LoadedEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **ENCODERS[config.encoder]))
    return LoadedEncoder(model.to(config.device).eval().requires_grad_(False), tokenizer, f"random-{config.encoder}")


def untrained_checkpoint(lm: LoadedLM, encoder: LoadedEncoder, directory: Path, smoke: bool) -> Path:
    """A RECIPE checkpoint for this model's embedding size, untrained (the packaged relation gate
    beside it when the encoder has MiniLM's width, so the gate's cost is in the timing)."""
    import shutil

    from editstream.methods.recipe.checkpoint import PACKAGED, save_checkpoint
    from editstream.methods.recipe.config import RecipeConfig
    from editstream.methods.recipe.network import RecipeNet
    from editstream.methods.recipe.relation import GATE_FILES

    config = RecipeConfig(encoder=encoder.name)
    if smoke:
        config = RecipeConfig(
            encoder=encoder.name, key_dim=16, retriever_hidden=32, prompt_len=3, generator_hidden=32, target_slots=2
        )
    emb = lm.model.get_input_embeddings().weight
    net = RecipeNet(encoder.dim, emb.shape[1], config, emb.float().mean(0).cpu())
    save_checkpoint(net, directory, {"llm": lm.name})
    if encoder.dim == 384 and all((PACKAGED / f).is_file() for f in GATE_FILES):
        for f in GATE_FILES:
            shutil.copy(PACKAGED / f, directory / f)
    return directory


def untrained_hypernets(lm: LoadedLM, directory: Path) -> Path:
    """RLEdit hypernetworks for this model's shapes, untrained: an edit's cost does not depend on
    their weights (what they do to answers does, and is measured elsewhere)."""
    from editstream.methods.rledit.config import RLEditConfig
    from editstream.methods.rledit.method import new_hypernets, save_hypernets

    config = RLEditConfig()
    save_hypernets(new_hypernets(lm, config), config, directory, {"llm": lm.name, "untrained": True})
    return directory


def synthetic_corpus(directory: Path, facts: list[EditRequest]) -> Path:
    """A small text corpus for ROME/MEMIT's key statistics (the data sets do not travel)."""
    texts = [{"text": " ".join(f"{f.prompt} {f.target}." for f in facts[i : i + 8])} for i in range(0, len(facts), 8)]
    path = directory / "corpus.json"
    path.write_text(json.dumps(texts))
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(1000 * statistics.median(values), 2), "max_ms": round(1000 * max(values), 2)}


def edit_costs(
    method_name: str, lm: LoadedLM, facts: list[EditRequest], options: dict[str, Any], batch: int = 20
) -> dict[str, Any]:
    """Seconds to compute one edit (median over the samples, the first one apart: it builds caches
    such as ROME's key statistics; a method that solves batches jointly, MEMIT and RLEdit, is timed
    on batches of `batch` and reported per edit) and milliseconds to apply and to remove one edit."""
    method = create_method(method_name, lm, **options)
    replica = Replica(method)
    size = batch if method.batch_edits else 1
    compute, apply, remove = [], [], []
    first_s = None
    artifacts = []
    try:
        for i in range(0, len(facts), size):
            part = facts[i : i + size]
            t = time.perf_counter()
            made = method.compute(part)
            _sync(lm.device)
            took = (time.perf_counter() - t) / len(part)
            if first_s is None:
                first_s = took
            else:
                compute.append(took)
            for artifact in made:
                t = time.perf_counter()
                replica.apply(len(artifacts) + 1, artifact)
                _sync(lm.device)
                apply.append(time.perf_counter() - t)
                artifacts.append(artifact)
        for seq, fact in enumerate(facts, start=len(facts) + 1):
            t = time.perf_counter()
            replica.retract(seq, fact.edit_id)
            _sync(lm.device)
            remove.append(time.perf_counter() - t)
    finally:
        method.reset()
    return {
        "n": len(facts),
        "batch": size,
        "first_compute_s_per_edit": round(first_s or 0.0, 4),
        "compute_s_median": round(statistics.median(compute), 4) if compute else None,
        "apply": _ms(apply),
        "remove": _ms(remove),
        "artifact_bytes_mean": round(statistics.fmean(a.nbytes for a in artifacts)),
    }


def chat_throughput(replica: Replica, prompts: list[str], tokens: int) -> dict[str, Any]:
    """Generated tokens per second for one batch of chat requests (after a warm-up batch)."""
    replica.generate(prompts, 2, chat=True)
    _sync(replica.lm.device)
    t = time.perf_counter()
    answers = replica.generate(prompts, tokens, chat=True)
    _sync(replica.lm.device)
    took = time.perf_counter() - t
    produced = sum(a.completion_tokens for a in answers)
    return {
        "batch": len(prompts),
        "tokens": produced,
        "seconds": round(took, 3),
        "tokens_per_s": round(produced / took, 1),
        "fired": sum(a.fired is not None for a in answers),
    }


def _part(results: dict[str, Any], name: str, fn: Callable[[], Any], deadline: float) -> None:
    """Run one part; record its result, or its error, and how long it took (past `deadline`, a
    perf_counter time, the part is skipped and says so)."""
    t = time.perf_counter()
    if t > deadline:
        results[name] = {"not_measured": "skipped: the run's time budget was spent"}
        return
    log.info("gpu bench: %s", name)
    try:
        results[name] = fn()
    except Exception as exc:  # one lease, one try: a failing part must not lose the others
        log.error("gpu bench part %s failed: %s", name, exc)
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
    results.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t, 1)


def run(config: GpuBenchConfig, assets: Path | None = None) -> dict[str, Any]:
    """Every measurement of the GPU run, as one JSON-ready dict."""
    llm_tok, enc_tok = load_tokenizers(assets)
    t = time.perf_counter()
    deadline = t + config.budget_s
    lm = random_lm(config, llm_tok)
    encoder = random_encoder(config, enc_tok)
    params = sum(p.numel() for p in lm.model.parameters())
    out: dict[str, Any] = {
        "config": asdict(config),
        "model": {"name": lm.name, "parameters": params, "dtype": config.dtype, "vocab": len(llm_tok)},
        "build_s": round(time.perf_counter() - t, 1),
    }
    facts = demo_facts(config.real_edits)
    probes = [f.paraphrases[0] for f in facts if f.paraphrases][: config.probes]
    stored_prompts = [f.prompt for f in facts[: config.probes]]
    work = Path(tempfile.mkdtemp(prefix="editstream-gpu-"))
    checkpoint = untrained_checkpoint(lm, encoder, work / "recipe", config.shape == "tiny")
    recipe_options = {"checkpoint": checkpoint, "encoder": encoder}
    unedited = Replica(create_method("none", lm))

    def recipe_latency() -> dict[str, Any]:
        recipe = create_method("recipe", lm, **recipe_options)
        artifacts = recipe.compute(facts)
        rows: dict[str, Any] = {}
        for count in config.stored:
            if time.perf_counter() > deadline:
                rows[str(count)] = {"not_measured": "skipped: the run's time budget was spent"}
                continue
            started = time.perf_counter()
            cost.fill(recipe, artifacts, count)
            filled_s = time.perf_counter() - started
            setups = {"unedited": unedited, f"recipe@{count}": Replica(recipe)}
            searched = cost.query_latency(setups, probes, config.new_tokens, config.rounds)
            exact = cost.query_latency(setups, stored_prompts, config.new_tokens, config.rounds)
            for table in (searched, exact):
                base = table["unedited"]["median_ms"]
                for row in table.values():
                    row["vs_unedited"] = round(row["median_ms"] / base, 3)
            rows[str(count)] = {
                "stored": len(recipe.edit_ids()),
                "fill_s": round(filled_s, 1),
                "searched": searched,
                "exact_prompt": exact,
            }
        recipe.reset()
        return rows

    def scen_latency() -> dict[str, Any]:
        scen = create_method("scen", lm)
        artifacts = scen.compute([f for f in facts if f.subject][:4])
        cost.fill(scen, artifacts, config.scen_stored, key="neuron_w")
        setups = {"unedited": unedited, f"scen@{config.scen_stored}": Replica(scen)}
        table = cost.query_latency(setups, stored_prompts, config.new_tokens, config.rounds)
        base = table["unedited"]["median_ms"]
        for row in table.values():
            row["vs_unedited"] = round(row["median_ms"] / base, 3)
        scen.reset()
        return table

    def chat() -> dict[str, Any]:
        recipe = create_method("recipe", lm, **recipe_options)
        for a in recipe.compute(facts):
            recipe.apply(a)
        questions = (probes * config.chat_batch)[: config.chat_batch]
        return {
            "unedited": chat_throughput(unedited, questions, config.chat_tokens),
            "recipe": chat_throughput(Replica(recipe), questions, config.chat_tokens),
        }

    corpus = synthetic_corpus(work, demo_facts(400))
    per_method = {
        "rledit": {"checkpoint": str(untrained_hypernets(lm, work / "rledit"))},
        "recipe": recipe_options,
        "scen": {},
        "rome": {"mom2_corpus": str(corpus), "mom2_samples": 4096},
        "memit": {"mom2_corpus": str(corpus), "mom2_samples": 4096},
    }
    _part(out, "query_latency_recipe", recipe_latency, deadline)
    _part(out, "chat_batch", chat, deadline)
    _part(out, "query_latency_scen", scen_latency, deadline)
    edits: dict[str, Any] = {}
    for name in config.methods:
        batched = name in ("memit", "rledit")
        wanted = (config.edit_samples + 1) * (config.batch if batched else 1)
        sample = [f for f in demo_facts(max(wanted * 2, len(facts))) if f.subject][:wanted]
        _part(
            edits,
            name,
            lambda name=name, sample=sample: edit_costs(name, lm, sample, per_method[name], config.batch),
            deadline,
        )
    out["edit_costs"] = edits
    if lm.device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(lm.device)
    return out


__all__ = ["GpuBenchConfig", "run", "save_assets"]
