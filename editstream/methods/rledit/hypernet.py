"""The shift network and the ridge solve.

For each edited module and each key position: the module's input `u` (d_in) and the edit loss's
gradient with respect to its output `delta` (d_out). One `ShiftNet` per weight shape normalises
concat(u, delta) with a running mean and variance, passes it through residual low-rank blocks with
a per-module scale and shift, and splits it into (u~, delta~). The value change at that position is
v = -exp(log_lr[m]) * (u . u~) * delta~; the weight shift solves min |U dW - V|^2 + exp(lambda[m]) |dW|^2:
dW = (U^T U + e^l I)^-1 U^T V = U^T (U U^T + e^l I)^-1 V, which stays low-rank (one term per key).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RunningNorm(nn.Module):
    """Feature-wise standardisation with statistics gathered while training (frozen at serving)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of rows into the statistics (parallel-variance merge)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        n, total = len(x), self.count + len(x)
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        shift = mean - self.mean
        self.var.copy_((self.var * self.count + var * n + shift**2 * self.count * n / total) / total)
        self.mean.add_(shift * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var + 1e-5).sqrt()


class Block(nn.Module):
    """x + up(relu(down(x))), then a per-module scale and shift; starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modules: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(n_modules, dim))
        self.shift = nn.Parameter(torch.zeros(n_modules, dim))

    def forward(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return (x + self.up(F.relu(self.down(x)))) * self.scale[m] + self.shift[m]


class ShiftNet(nn.Module):
    """Maps (u, delta) rows of the modules of one weight shape to their value changes."""

    def __init__(self, d_in: int, d_out: int, n_modules: int, rank: int, blocks: int, lr: float, lam: float) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out)
        self.blocks = nn.ModuleList(Block(d_in + d_out, rank, n_modules) for _ in range(blocks))
        # the step is learnt as its logarithm: an optimiser's fixed-size updates would flip the sign of
        # a raw step of 1e-4 in one move, and the useful steps span orders of magnitude
        self.log_lr = nn.Parameter(torch.full((n_modules,), math.log(lr)))
        self.log_lambda = nn.Parameter(torch.full((n_modules,), lam))

    def values(self, u: torch.Tensor, delta: torch.Tensor, m: int) -> torch.Tensor:
        """v (N, d_out) for keys u (N, d_in) and output gradients delta (N, d_out) of module `m`."""
        x = torch.cat([u, delta], dim=-1).float()
        if self.training:
            self.norm.update(x)
        h = self.norm(x)
        for block in self.blocks:
            h = block(h, m)
        u_t, d_t = h.split([self.d_in, self.d_out], dim=-1)
        return -self.log_lr[m].exp() * (u.float() * u_t).sum(-1, keepdim=True) * d_t


def ridge_factors(u: torch.Tensor, v: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
    """A (N, d_out) with dW = U^T A = (U^T U + e^l I)^-1 U^T V: the shift (d_in, d_out) that maps each
    key u_i close to its value change v_i, kept small; solved in the N x N key space."""
    u, v = u.float(), v.float()
    gram = u @ u.T + torch.exp(log_lambda) * torch.eye(len(u), device=u.device)
    return torch.linalg.solve(gram, v)
