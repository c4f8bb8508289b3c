"""SCEN's two per-fact parts: the expert (what the FFN adds for this fact) and its indexing neuron.

Low-rank expert (ours, default): rank-r changes A, B to each of the FFN's three matrices
(W + B A), about 50 KB at rank 4. Narrow expert (ours): delta(x) = silu(x W_in^T + b_in) W_out^T
added to the FFN output. Full expert (published form): a trained copy of the FFN's own matrices,
whose output replaces the FFN's. An expert acts on a routed row at the token where its neuron
fired. The neuron fires when the normalised FFN input of the routing layer is close enough to its
fact's key (see method.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def new_expert(kind: str, mlp: nn.Module, width: int) -> dict[str, torch.Tensor]:
    """Trainable expert tensors: narrow and low-rank start as a zero change, full as a copy of `mlp`."""
    if kind == "full":
        return {n: mlp.get_submodule(n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    ref = next(mlp.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(ref.device, ref.dtype)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=ref.device, dtype=ref.dtype)

    if kind == "lowrank":
        d, i = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        return {
            "a_gate": rand(width, d),
            "b_gate": zeros(i, width),
            "a_up": rand(width, d),
            "b_up": zeros(i, width),
            "a_down": rand(width, i),
            "b_down": zeros(d, width),
        }
    d = mlp.gate_proj.in_features if hasattr(mlp, "gate_proj") else mlp.c_fc.weight.shape[0]
    return {"w_in": rand(width, d), "b_in": zeros(width), "w_out": zeros(d, width)}


def _lin(x: torch.Tensor, w: torch.Tensor, batched: bool) -> torch.Tensor:
    """x @ w^T, with one `w` per row of x when batched (x: (R, T, in), w: (R, out, in))."""
    return torch.einsum("rti,roi->rto", x, w) if batched else F.linear(x, w)


def expert_output(
    kind: str, t: dict[str, torch.Tensor], x: torch.Tensor, base: torch.Tensor, mlp: nn.Module, batched: bool = False
) -> torch.Tensor:
    """The FFN output with the expert in effect, for inputs `x` whose plain FFN output is `base`.
    batched: every tensor in `t` has a leading row dimension, one expert per row of `x`."""
    if kind == "full":
        return F.linear(F.silu(F.linear(x, t["gate_proj"])) * F.linear(x, t["up_proj"]), t["down_proj"])
    if kind == "lowrank":

        def low(inp: torch.Tensor, name: str) -> torch.Tensor:
            return _lin(_lin(inp, t[f"a_{name}"], batched), t[f"b_{name}"], batched)

        h = F.silu(mlp.gate_proj(x) + low(x, "gate")) * (mlp.up_proj(x) + low(x, "up"))
        return mlp.down_proj(h) + low(h, "down")
    b_in = t["b_in"][:, None] if batched else t["b_in"]
    return base + _lin(F.silu(_lin(x, t["w_in"], batched) + b_in), t["w_out"], batched)


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
