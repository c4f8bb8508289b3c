"""Second-moment statistics of MLP keys, C = E[k k^T], from a local text corpus, cached on disk.

A key is the input of a layer's MLP output matrix (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`) at
one token (site "key"), or the input of the MLP itself (site "mlp": what `gate_proj`/`up_proj`/
`c_fc` read, RLEdit's keys). ROME and MEMIT use C to spread an edit's change over directions the
model rarely uses; RLEdit can confine its shifts to them (`null_space.py`).
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
from torch import nn
from tqdm import tqdm

from editstream.data import DEFAULT_DATA_DIR, read_records
from editstream.errors import ConfigError, DataFormatError
from editstream.methods.rome.weights import is_transposed, key_module
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


SITES = ("key", "mlp")


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose input is measured: the MLP output matrix ("key") or the MLP ("mlp")."""
    if site == "key":
        return key_module(model, layer)
    if site == "mlp":
        key_module(model, layer)  # the same layer checks
        return decoder_layers(model)[layer].mlp
    raise ConfigError(f"statistics site {site!r}: expected one of {', '.join(SITES)}")


def site_width(model: nn.Module, layer: int, site: str) -> int:
    """The width of the vectors measured at `site`."""
    if site == "mlp":
        return int(model.config.hidden_size)
    w = key_module(model, layer)
    return w.weight.shape[0] if is_transposed(w) else w.weight.shape[1]


def _cache_path(lm: LoadedLM, layer: int, corpus_hash: str, sample_size: int, site: str) -> Path:
    tag = "" if site == "key" else f"-{site}"  # the key site keeps the names caches already have
    name = f"{lm.fingerprint[:16]}-L{layer}{tag}-{corpus_hash[:12]}-n{sample_size}.safetensors"
    return cache_dir() / "rome-stats" / name


def second_moments(
    lm: LoadedLM,
    layers: list[int],
    corpus: str | Path = DEFAULT_CORPUS,
    sample_size: int = 100_000,
    window: int = 256,
    batch: int = 8,
    site: str = "key",
) -> dict[int, torch.Tensor]:
    """E[k k^T] at each of `layers` (float32, on the model's device), from cache when possible."""
    texts = corpus_texts(corpus)
    corpus_hash = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()
    out, todo = {}, []
    for layer in layers:
        path = _cache_path(lm, layer, corpus_hash, sample_size, site)
        width = site_width(lm.model, layer, site)  # a cache entry of another shape is stale
        cached = load_file(str(path))["mom2"] if path.is_file() else None
        if cached is not None and cached.shape[0] == width:
            out[layer] = cached.to(lm.device)
        else:
            todo.append(layer)
    if todo:
        fresh = _measure(lm, todo, texts, sample_size, window, batch, site)
        for layer, (mom2, count) in fresh.items():
            path = _cache_path(lm, layer, corpus_hash, sample_size, site)
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"model": lm.name, "layer": str(layer), "corpus": str(corpus), "tokens": str(count), "site": site}
            save_file({"mom2": mom2.cpu().contiguous()}, str(path), metadata=meta)
            out[layer] = mom2.to(lm.device)
    return out


def _measure(
    lm: LoadedLM, layers: list[int], texts: list[str], sample_size: int, window: int, batch: int, site: str
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

    handles = [site_module(model, layer, site).register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(windows), batch), desc=f"{site} statistics, layers {layers}", unit="batch"):
                chunk = torch.tensor(windows[i : i + batch], device=lm.device)
                with contextlib.suppress(_Stop):
                    model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    depth = len(decoder_layers(model))
    log.info("%s statistics of layers %s from %d tokens (%d layers deep)", site, layers, counts[top], depth)
    return {layer: ((sums[layer] / counts[layer]).float(), counts[layer]) for layer in layers}
