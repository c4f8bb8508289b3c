"""Second-moment statistics of MLP keys, C = E[k k^T], from a local text corpus, cached on disk.

A key is the input of a layer's MLP output matrix (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`) at
one token. ROME and MEMIT use C to spread an edit's change over directions the model rarely uses.
The corpus is read from JSON (`[{"text": ...}]`, default `hallucination/openwebtext.json`), cut
into windows of `window` tokens and run through the model up to the highest layer needed, until
`sample_size` tokens are counted. Results are cached as safetensors under
`<cache>/rome-stats/`, keyed by model fingerprint, layer, corpus content hash and sample size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from editstream.data import DEFAULT_DATA_DIR, read_records
from editstream.errors import DataFormatError
from editstream.methods.rome.weights import key_module
from editstream.methods.scen.layers import _Stop, decoder_layers
from editstream.models import LoadedLM, cache_dir

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "hallucination/openwebtext.json"


def corpus_texts(path: str | Path) -> list[str]:
    """The `text` fields of a JSON list (or JSON lines) corpus file; relative to the data dir if not found."""
    p = Path(path)
    if not p.is_file() and (DEFAULT_DATA_DIR / p).is_file():
        p = DEFAULT_DATA_DIR / p
    if not p.is_file():
        raise DataFormatError(f"corpus {path!s} not found (also looked in {DEFAULT_DATA_DIR})")
    texts = [r["text"] for r in read_records(p) if isinstance(r.get("text"), str) and r["text"].strip()]
    if not texts:
        raise DataFormatError(f"{p}: expected a JSON list of objects with a non-empty 'text' field")
    return texts


def _cache_path(lm: LoadedLM, layer: int, corpus_hash: str, sample_size: int) -> Path:
    return cache_dir() / "rome-stats" / f"{lm.fingerprint[:16]}-L{layer}-{corpus_hash[:12]}-n{sample_size}.safetensors"


def second_moments(
    lm: LoadedLM,
    layers: list[int],
    corpus: str | Path = DEFAULT_CORPUS,
    sample_size: int = 100_000,
    window: int = 256,
    batch: int = 8,
) -> dict[int, torch.Tensor]:
    """E[k k^T] at each of `layers` (float32, on the model's device), from cache when possible."""
    texts = corpus_texts(corpus)
    corpus_hash = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()
    out, todo = {}, []
    for layer in layers:
        path = _cache_path(lm, layer, corpus_hash, sample_size)
        width = key_module(lm.model, layer).weight.shape  # a cache entry of another shape is stale
        cached = load_file(str(path))["mom2"] if path.is_file() else None
        if cached is not None and cached.shape[0] in width:
            out[layer] = cached.to(lm.device)
        else:
            todo.append(layer)
    if todo:
        fresh = _measure(lm, todo, texts, sample_size, window, batch)
        for layer, (mom2, count) in fresh.items():
            path = _cache_path(lm, layer, corpus_hash, sample_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"model": lm.name, "layer": str(layer), "corpus": str(corpus), "tokens": str(count)}
            save_file({"mom2": mom2.cpu().contiguous()}, str(path), metadata=meta)
            out[layer] = mom2.to(lm.device)
    return out


def _measure(
    lm: LoadedLM, layers: list[int], texts: list[str], sample_size: int, window: int, batch: int
) -> dict[int, tuple[torch.Tensor, int]]:
    tok, model = lm.tokenizer, lm.model
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) == window]
    need = -(-sample_size // window)
    if len(windows) < need:
        log.warning("corpus has %d tokens, fewer than the %d asked for", len(windows) * window, sample_size)
    windows = windows[:need]
    sums: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    top = max(layers)

    def hook_for(layer: int):
        def hook(_module, args):
            k = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[layer] = sums.get(layer, 0) + k.T @ k
            counts[layer] += k.shape[0]
            if layer == top:
                raise _Stop

        return hook

    handles = [key_module(model, layer).register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(windows), batch), desc=f"key statistics, layers {layers}", unit="batch"):
                chunk = torch.tensor(windows[i : i + batch], device=lm.device)
                with contextlib.suppress(_Stop):
                    model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    log.info(
        "key statistics of layers %s from %d tokens (%d layers deep)", layers, counts[top], len(decoder_layers(model))
    )
    return {layer: ((sums[layer] / counts[layer]).float(), counts[layer]) for layer in layers}
