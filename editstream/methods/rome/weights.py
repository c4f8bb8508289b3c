"""The MLP output matrix that ROME and MEMIT rewrite, for Llama- and GPT-2-family models.

Llama: `model.layers[l].mlp.down_proj` (nn.Linear, weight (d_model, d_ff)). GPT-2:
`transformer.h[l].mlp.c_proj` (Conv1D, weight (d_ff, d_model), i.e. transposed). Its input at a
token is the key k (d_ff), its output the value written to the residual stream (d_model). An edit
is a sum of rank-one changes u v^T (u: d_model, v: d_ff) in (out, in) orientation; `delta` lays
one out in the weight's own orientation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editstream.artifacts import Artifact
from editstream.errors import ConfigError
from editstream.methods.base import EditMethod
from editstream.methods.scen.layers import decoder_layers


def key_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose input is the key and whose weight is rewritten."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(f"layer {layer} is outside the model's {len(layers)} layers")
    mlp = layers[layer].mlp
    for name in ("down_proj", "c_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ConfigError(f"{type(mlp).__name__} has neither down_proj (Llama) nor c_proj (GPT-2)")


def param_name(model: nn.Module, layer: int) -> str:
    target = key_module(model, layer).weight
    return next(n for n, p in model.named_parameters() if p is target)


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is (in, out)."""
    return not isinstance(module, nn.Linear)


def delta(module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i u_i v_i^T in the weight's orientation; u: (d_model, r) or (d_model,), v: (d_ff, r) or (d_ff,)."""
    u2 = u.reshape(u.shape[0], -1).to(module.weight.device, torch.float32)
    v2 = v.reshape(v.shape[0], -1).to(module.weight.device, torch.float32)
    d = (u2 @ v2.T).to(module.weight.dtype)  # solved in float32, stored as the weight is (bf16 too)
    return d.T if is_transposed(module) else d


def output_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` in float32, whatever dtype the module's weight has."""
    return module(x.to(module.weight.dtype)).float()


@contextmanager
def temporarily_added(changes: list[tuple[nn.Module, torch.Tensor]]) -> Iterator[None]:
    """Add weight changes for the duration of the block; the original weights come back bit for bit."""
    saved = [(m, m.weight.detach().clone()) for m, _ in changes]
    try:
        with torch.no_grad():
            for m, d in changes:
                m.weight += d
        yield
    finally:
        with torch.no_grad():
            for m, original in saved:
                m.weight.copy_(original)


class WeightEdit(EditMethod):
    """A method whose artifact is a sum of low-rank weight changes: applying adds them to the
    weights, removing subtracts them (ROME, MEMIT, RLEdit). Subclasses say which changes an
    artifact holds (`_changes`: (module, change in the weight's own orientation) pairs)."""

    def _changes(self, artifact: Artifact) -> list[tuple[nn.Module, torch.Tensor]]:
        raise NotImplementedError

    def _attach(self, artifact: Artifact) -> None:
        with torch.no_grad():
            for m, d in self._changes(artifact):
                m.weight += d

    def _detach(self, edit_id: str) -> None:
        with torch.no_grad():
            for m, d in self._changes(self.artifact(edit_id)):
                m.weight -= d
