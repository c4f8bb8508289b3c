"""Running a decoder from one layer upward: capture a layer's input once, then train above it.

The layers below the edited one are frozen and never change, so their output (the edited layer's
input, with the attention mask and position embeddings the model passed along) is computed once per
training batch; every training step then runs only the edited layer and those above it.
Supports Llama-family (`model.layers`, `model.norm`) and GPT-2-family (`transformer.h`,
`transformer.ln_f`) causal LMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editstream.errors import ConfigError
from editstream.generation import positions


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early, once what was wanted is captured."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ConfigError(f"{type(model).__name__}: no decoder layers at model.layers or transformer.h")


def final_norm(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None) or model.transformer
    return getattr(inner, "norm", None) or inner.ln_f


@dataclass
class LayerInput:
    """What one decoder layer received: hidden states and the arguments beside them (GPT-2 passes
    its attention mask positionally: dropping `args` would let padded rows attend to the padding)."""

    hidden: torch.Tensor  # (B, T, d)
    kwargs: dict[str, Any]
    args: tuple = ()


def capture_layer_input(model: nn.Module, layer: int, input_ids: torch.Tensor, mask: torch.Tensor) -> LayerInput:
    """Run the model up to decoder layer `layer` (no grad) and return that layer's input."""
    box: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        box["hidden"] = args[0] if args else kwargs["hidden_states"]
        box["args"] = tuple(args[1:])
        box["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return LayerInput(box["hidden"], box["kwargs"], box["args"])


def run_from(model: nn.Module, layer: int, inp: LayerInput) -> torch.Tensor:
    """Final normalised hidden states from running decoder layers `layer`.. on `inp`."""
    h = inp.hidden
    for block in decoder_layers(model)[layer:]:
        out = block(h, *inp.args, **inp.kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return final_norm(model)(h)


def mlp_input(model: nn.Module, layer: int, inp: LayerInput) -> torch.Tensor:
    """The input of decoder layer `layer`'s FFN (after its attention and norm), (B, T, d), no grad."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module, args):
        box["x"] = args[0]
        raise _Stop

    block = decoder_layers(model)[layer]
    handle = block.mlp.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            block(inp.hidden, *inp.args, **inp.kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["x"]
