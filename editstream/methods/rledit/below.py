"""Skipping the layers below the edited band for inputs already seen, while training RLEdit.

RLEdit shifts only weights from its first edited layer up, so during training the hidden states
entering that layer are a fixed function of the input. A training step forwards the same batch
several times (reading keys, scoring the batch, memory backtracking in later steps, the locality
KL before and after the shift), so `BelowBand` keeps the hidden states entering the first edited
layer for the last few distinct inputs and, when an input comes again, runs only the layers from
there up. The cached tensors are detached: nothing below the band takes a gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from editstream.methods.scen.layers import decoder_layers


def _layers_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layer list and its attribute name (`model.layers`, `transformer.h`)."""
    layers = decoder_layers(model)
    for owner in model.modules():
        for name, child in owner.named_children():
            if child is layers:
                return owner, name
    raise RuntimeError(f"{type(model).__name__}: the decoder layer list has no parent module")


class BelowBand:
    """Until `remove()` (or the end of a `with` block), forwards of `model` skip layers `[0, start)`
    for inputs seen in the last `size` distinct (input_ids, attention_mask) pairs. `hits` and
    `misses` count the forwards."""

    def __init__(self, model: nn.Module, start: int, size: int = 32) -> None:
        if start <= 0:
            raise ValueError(f"BelowBand needs a first edited layer above 0, got {start}")
        self.layers = decoder_layers(model)
        self.owner, self.attr = _layers_owner(model)
        self.start, self.size = start, size
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._key: bytes | None = None
        self._hidden: torch.Tensor | None = None
        base = getattr(model, "base_model", model)
        self.handles = [
            base.register_forward_pre_hook(self._before, with_kwargs=True),
            base.register_forward_hook(self._after, always_call=True),
            self.layers[start].register_forward_pre_hook(self._entering, with_kwargs=True),
        ]

    @staticmethod
    def _key_of(kwargs: dict[str, Any]) -> bytes | None:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None or mask is None:
            return None  # embeddings passed in: not cacheable by input
        shape = ",".join(map(str, ids.shape)).encode()
        return shape + b"|" + ids.cpu().numpy().tobytes() + b"|" + mask.cpu().numpy().tobytes()

    def _before(self, _module, args, kwargs):
        self._key = self._key_of(kwargs) if not args else None
        self._hidden = self.cache.get(self._key) if self._key is not None else None
        if self._hidden is not None:
            self.hits += 1
            self.cache.move_to_end(self._key)
            setattr(self.owner, self.attr, nn.ModuleList(list(self.layers)[self.start :]))
        elif self._key is not None:
            self.misses += 1

    def _entering(self, _module, args, kwargs):
        if self._hidden is not None:  # a cached input: replace what the (skipped) layers would give
            return (self._hidden, *args[1:]), kwargs
        if self._key is not None:
            self.cache[self._key] = args[0].detach()
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return None

    def _after(self, _module, _args, _out):
        if self._hidden is not None:
            setattr(self.owner, self.attr, self.layers)
        self._key = self._hidden = None

    def remove(self) -> None:
        setattr(self.owner, self.attr, self.layers)
        for h in self.handles:
            h.remove()
        self.cache.clear()

    def __enter__(self) -> BelowBand:
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()
