"""Confining RLEdit's shifts to directions ordinary text hardly uses (after AlphaEdit, Fang et al. 2025).

A shift dW = K^T A changes an edited module's output on an input x by (x K^T) A. With each key
projected first, K P, where P projects onto the eigenvectors of the module inputs' second moment
E[x x^T] (measured on a text corpus) whose eigenvalue is below `threshold` times the mean one,
x P K^T is close to zero for text like the corpus: the edit leaves unrelated inputs alone, and it
reaches its own inputs through their components in those directions. The ridge solve then maps the
projected keys to the values (K P P K^T = K P K^T), so what is stored and applied is the same
low-rank form with projected keys; replicas never need P.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from editstream.errors import ConfigError
from editstream.methods.rome.stats import second_moments
from editstream.methods.rome.weights import key_module
from editstream.models import LoadedLM

log = logging.getLogger(__name__)


def projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P (d, d): onto the eigenvectors of `mom2` whose eigenvalue is below threshold x the mean."""
    if not threshold > 0:
        raise ConfigError(f"null_space threshold {threshold}: expected > 0 (0 switches the projection off)")
    values, vectors = torch.linalg.eigh(mom2.double())
    basis = vectors[:, values < threshold * values.mean()]
    return (basis @ basis.T).float()


def projections(
    lm: LoadedLM, named: Sequence[tuple[str, nn.Module]], threshold: float, corpus: str, tokens: int
) -> list[torch.Tensor]:
    """One P per edited (name "<layer>.<proj>", module); modules reading the same
    input share one. The MLP output matrix (`key_module`) reads the MLP's hidden activations ("key"
    statistics), every other projection the MLP's input ("mlp")."""
    sites = []
    for name, module in named:
        layer = int(name.split(".")[0])
        sites.append((layer, "key" if module is key_module(lm.model, layer) else "mlp"))
    found: dict[tuple[int, str], torch.Tensor] = {}
    for site in sorted({s for _, s in sites}):
        layers = sorted({layer for layer, s in sites if s == site})
        mom2 = second_moments(lm, layers, corpus, tokens, site=site)
        for layer in layers:
            p = projection(mom2[layer], threshold).to(lm.device)
            kept = round(float(p.trace()))  # a projection's trace is its rank
            if kept == 0:
                raise ConfigError(
                    f"rledit layer {layer}: no {site} input direction has a second moment below {threshold} x "
                    "the mean, so every shift would be zero; raise null_space"
                )
            log.info("rledit layer %d (%s input): shifts confined to %d of %d directions", layer, site, kept, len(p))
            found[(layer, site)] = p
    return [found[s] for s in sites]
