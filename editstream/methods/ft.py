"""`ft`: FT-L, sequential fine-tuning of one MLP output matrix per edit (the classic forgetting baseline).

compute trains a delta for `model.layers[layer].mlp.down_proj.weight` with the prompt -> target
loss, through `torch.func.functional_call` so the model itself is never touched; edits in one
batch build on each other. The artifact is the delta (float16); apply adds it, remove subtracts it.
Because each edit is fine-tuned on top of the earlier ones, ft is `sequential`: its editor applies
what it computed to its own copy before the next edit, and only one editor may run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from editstream.artifacts import Artifact
from editstream.config import config_from_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.methods.base import EditMethod
from editstream.metrics import encode_pairs
from editstream.models import LoadedLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTConfig:
    layer: int = -1  # -1: the middle layer
    steps: int = 10
    lr: float = 5e-4
    module: str = "model.layers.{layer}.mlp.down_proj.weight"


class FineTune(EditMethod):
    """One weight delta per edit on one MLP matrix; forgets earlier edits as later ones pile up."""

    name = "ft"
    sequential = True

    def __init__(self, lm: LoadedLM, config: FTConfig) -> None:
        super().__init__(lm)
        n_layers = lm.model.config.num_hidden_layers
        layer = config.layer if config.layer >= 0 else n_layers // 2
        if not 0 <= layer < n_layers:
            raise ConfigError(f"ft layer {config.layer} is outside the model's {n_layers} layers")
        self.config = config
        self.param_name = config.module.format(layer=layer)
        params = dict(lm.model.named_parameters())
        if self.param_name not in params:
            raise ConfigError(f"ft: the model has no parameter {self.param_name!r}")
        self.weight = params[self.param_name]

    @classmethod
    def build(cls, lm: LoadedLM, **options) -> FineTune:
        return cls(lm, config_from_dict(FTConfig, options))

    def _delta_for(self, edit: EditRequest, base: torch.Tensor) -> torch.Tensor:
        batch = encode_pairs(self.lm.tokenizer, [edit.prompt], [edit.target])
        dev = self.lm.device
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        start, answer = batch.answer_start[0], torch.tensor(batch.answer_ids[0], device=dev)
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.config.lr)
        for _ in range(self.config.steps):
            out = functional_call(
                self.lm.model,
                {self.param_name: base + delta},
                args=(),
                kwargs={"input_ids": ids, "attention_mask": mask},
            )
            logits = out.logits[0, start - 1 : start - 1 + len(answer)]
            loss = F.cross_entropy(logits, answer)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return delta.detach()

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        running = torch.zeros_like(self.weight)
        out = []
        with torch.enable_grad():
            for edit in edits:
                delta = self._delta_for(edit, self.weight.detach() + running).half()
                running += delta.float()
                out.append(self.new_artifact(edit, {"delta": delta}, param=self.param_name))
        return out

    def _attach(self, artifact: Artifact) -> None:
        delta = artifact.tensors["delta"]
        if artifact.meta.get("param") != self.param_name or delta.shape != self.weight.shape:
            raise ConfigError(
                f"artifact {artifact.edit_id} edits {artifact.meta.get('param')} "
                f"{tuple(delta.shape)}, this ft edits {self.param_name} {tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            self.weight += delta.to(self.weight.device, self.weight.dtype)

    def _detach(self, edit_id: str) -> None:
        with torch.no_grad():
            self.weight -= self.artifact(edit_id).tensors["delta"].to(self.weight.device, self.weight.dtype)
