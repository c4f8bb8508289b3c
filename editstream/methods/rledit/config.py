"""RLEdit settings: which weights it edits, the hypernetwork's size, the training recipe."""

from __future__ import annotations

from dataclasses import dataclass

UPDATES = ("trajectory", "batch")  # when the RLEdit trainer takes an optimiser step


@dataclass(frozen=True)
class RLEditConfig:
    """`layers` () = the default band (the decoder layers from 60% to 80% of the depth); `modules`:
    the MLP input projections of each (GPT-2: `c_fc`). `positions`: where keys and gradients are
    read, "answer" (the positions that predict the target's tokens) or "all" (every real token).
    `null_space` > 0 confines each shift to the input directions whose second moment on
    `null_space_corpus` (`null_space_tokens` tokens) is below that fraction of the mean
    (`null_space.py`); 0 leaves the keys as read."""

    layers: tuple[int, ...] = ()
    modules: tuple[str, ...] = ("gate_proj", "up_proj")
    positions: str = "answer"
    rank: int = 256  # width of each residual block's bottleneck
    blocks: int = 2
    init_lr: float = 3e-4  # per-module step on the value change, learnt (as its log)
    init_lambda: float = 0.0  # per-module log ridge strength, learnt
    batch: int = 20  # edits solved together (the editor hands runs of consecutive entries)
    null_space: float = 0.0
    null_space_corpus: str = "hallucination/openwebtext.json"
    null_space_tokens: int = 100_000

    def __post_init__(self) -> None:
        if self.null_space < 0:
            raise ValueError(f"null_space {self.null_space}: expected >= 0 (0: keys as read)")


@dataclass(frozen=True)
class TrainConfig:
    """Training on trajectories: `trajectory` consecutive batches of `batch` train edits, each solved
    on the model the earlier ones already changed; the loss per step is the batch's generality
    (its paraphrases and prompts) plus memory backtracking over the last `backtrack` batches (weight
    decay ** age), a locality KL to the model before the step, and an L2 penalty on the shift.
    `update`: when the optimiser steps, once per "trajectory" (the gradients of all its steps added
    up) or after every "batch" (each step's graph ends at its own shift, so the next batch is solved
    by the hypernetworks just updated: `trajectory` times as many updates for the same compute)."""

    trajectories: int = 200
    trajectory: int = 8
    batch: int = 20
    backtrack: int = 3
    decay: float = 0.5
    locality_weight: float = 1.0
    l2_weight: float = 1e-3
    lr: float = 1e-4
    log_lr: float = 1e-2  # Adam's step on the per-module log step sizes and log ridge strengths
    update: str = "trajectory"  # "trajectory" or "batch"
    cache_below: bool = True  # skip the layers below the band for inputs a trajectory has seen (below.py)
    validate_every: int = 10
    validation_edits: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update {self.update!r}: expected one of {', '.join(UPDATES)}")
