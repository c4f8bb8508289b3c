"""SCEN's two per-fact parts: the expert (what the FFN adds for this fact) and its indexing neuron.

Narrow expert (ours): delta(x) = silu(x W_in^T + b_in) W_out^T, width 16, added to the FFN output.
Full expert (published form): a trained copy of the FFN's own matrices, whose output replaces the
FFN's. Either acts on a routed row from its last prompt token onward. The neuron is a logistic unit
on the normalised FFN input at the last prompt token: it should fire for its fact and stay silent
for the negatives it is trained against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def new_expert(kind: str, mlp: nn.Module, width: int) -> dict[str, torch.Tensor]:
    """Trainable expert tensors: narrow starts as a zero delta, full as a copy of `mlp`."""
    if kind == "full":
        return {n: mlp.get_submodule(n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    d = mlp.gate_proj.in_features if hasattr(mlp, "gate_proj") else mlp.c_fc.weight.shape[0]
    ref = next(mlp.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    w_in = torch.randn(width, d, generator=gen) / d**0.5
    return {
        "w_in": w_in.to(ref.device, ref.dtype),
        "b_in": torch.zeros(width, device=ref.device, dtype=ref.dtype),
        "w_out": torch.zeros(d, width, device=ref.device, dtype=ref.dtype),
    }


def expert_output(kind: str, t: dict[str, torch.Tensor], x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The FFN output with the expert in effect, for inputs `x` whose plain FFN output is `base`."""
    if kind == "full":
        return F.linear(F.silu(F.linear(x, t["gate_proj"])) * F.linear(x, t["up_proj"]), t["down_proj"])
    return base + F.linear(F.silu(F.linear(x, t["w_in"], t["b_in"])), t["w_out"])


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def train_neuron(pos: torch.Tensor, neg: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic unit (w, b) on normalised features: fire (> 0) on `pos`, stay silent on `neg`."""
    pos, neg = normalize(pos), normalize(neg)
    direction = pos.mean(0) - neg.mean(0)
    w = (direction / direction.norm().clamp_min(1e-6) * 10).clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    weight = torch.cat([torch.full((len(pos),), len(neg) / max(1, len(pos))), torch.ones(len(neg))])
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def prototype_neuron(pos: torch.Tensor, neg: torch.Tensor, scale: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A neuron that fires when cos(x, mean positive) clears a threshold set between the positives'
    lowest and the negatives' highest similarity (clipped to [0.5, 0.95])."""
    proto = normalize(normalize(pos).mean(0))
    lo = float((normalize(pos) @ proto).min())
    hi = float((normalize(neg) @ proto).max()) if len(neg) else 0.0
    tau = min(0.95, max(0.5, (lo + hi) / 2))
    return proto * scale, torch.tensor(-tau * scale)
