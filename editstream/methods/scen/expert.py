"""SCEN's per-fact expert: what the FFN does differently for this fact (its neuron: neuron.py).

Low-rank expert (ours, default): rank-r changes A, B to each of the FFN's three matrices
(W + B A), about 50 KB at rank 4. Narrow expert (ours): delta(x) = silu(x W_in^T + b_in) W_out^T
added to the FFN output. Full expert (published form): a trained copy of the FFN's own matrices,
whose output replaces the FFN's. An expert acts on a routed row at the token where its neuron
fired.
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
