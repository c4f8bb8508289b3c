"""SCEN settings: where the experts sit, their shape, and how experts and neurons are trained."""

from __future__ import annotations

from dataclasses import dataclass

from editstream.errors import ConfigError

EXPERT_KINDS = ("lowrank", "narrow", "full")


@dataclass(frozen=True)
class ScenConfig:
    """Shape and training of SCEN's experts and indexing neurons.

    expert: "lowrank" (ours) trains rank-`width` changes to the FFN's three matrices; "narrow" adds a
    width-`width` FFN beside it; "full" (the published form) replaces the FFN with a trained copy
    of it for routed rows. max_negatives: earlier facts a
    new neuron is trained against (nearest by key); 0 means all of them (the published form).
    relation_gate: the neurons key on the subject, so alone they fire on any question about it; the
    gate (recipe/relation.py, trained on the train splits) keeps a fired expert only where the
    question, subject masked, asks what the edit's prompt asks.
    """

    layer: int = -1  # the expert's FFN; -1: seven eighths of the way up
    route_layer: int = -1  # the FFN whose input the neurons read; -1: a fifth of the way up
    act: str = "anchor"  # the expert acts at the anchor token only ("anchor") or from it on
    route_on: str = "subject"  # neuron keyed on the subject's token span (any prompt position) or "last"
    max_window: int = 8  # longest subject span a neuron reads, in tokens (longer subjects: their last ones)
    expert: str = "lowrank"
    width: int = 4  # rank of a low-rank expert, width of a narrow one
    expert_steps: int = 25  # at most; most CounterFact edits stop earlier, on stop_loss
    expert_lr: float = 0.02
    stop_loss: float = 0.005  # expert training ends once the mean target-token loss is below this
    after_weight: float = 1.0  # KL to the unedited model on the word after the target (no echoing)
    keep_weight: float = 0.0  # KL to the unedited model after other contexts of the subject (other relations)
    relation_gate: bool = True  # a fired expert must also ask its edit's relation (RECIPE's packaged gate)
    variants: int = 3  # prefixed copies of the prompt, for the expert and as neuron positives
    chat_variant: bool = True  # a question is also trained as the user turn of the model's chat template
    subject_swaps: int = 8  # hard negatives: the prompt with another subject
    neuron: str = "prototype"  # "prototype": cosine to the fact's key above a fitted threshold; "logistic"
    min_similarity: float = 0.75  # prototype neurons fire only above this cosine, whatever the fit says
    start_similarity: float = 0.95  # the same for start prototypes (an exact match scores 1)
    neuron_steps: int = 150
    neuron_lr: float = 0.05
    max_negatives: int = 32
    memory: int = 100_000  # earlier facts' keys kept for negative mining
    capacity: int = 256  # initial expert-bank slots (doubles when full)

    def __post_init__(self) -> None:
        if self.expert not in EXPERT_KINDS:
            raise ConfigError(f"scen expert={self.expert!r}; expected one of {EXPERT_KINDS}")
        if self.neuron not in ("prototype", "logistic"):
            raise ConfigError(f"scen neuron={self.neuron!r}; expected 'prototype' or 'logistic'")
        if self.act not in ("anchor", "from_anchor"):
            raise ConfigError(f"scen act={self.act!r}; expected 'anchor' or 'from_anchor'")
        if self.route_on not in ("subject", "last"):
            raise ConfigError(f"scen route_on={self.route_on!r}; expected 'subject' or 'last'")
        for name in ("width", "expert_steps", "neuron_steps", "capacity", "memory", "max_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scen {name}={getattr(self, name)} must be positive")
        for name in ("variants", "subject_swaps", "max_negatives", "after_weight", "keep_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"scen {name}={getattr(self, name)} must be >= 0")
