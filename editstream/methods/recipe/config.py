"""RECIPE settings: network shape and training; no machine facts (paths, devices) in here."""

from __future__ import annotations

from dataclasses import dataclass

from editstream.errors import ConfigError

GENERATOR_INPUTS = ("prompt+target", "statement")
TARGET_MODES = ("appended", "inside")


@dataclass(frozen=True)
class RecipeConfig:
    """Shape of the RECIPE networks.

    generator_input: "statement" is the paper's form (the generator reads the encoder's
    representation of "prompt target"); "prompt+target" is our variant, which reads the prompt's
    representation (computed once, shared with the key) plus the LLM's own input embeddings of the
    target tokens, so one encoder forward per edit suffices and the target's identity is kept.

    target_mode (variant only): "appended" puts up to `target_slots` target-token slots after the
    `prompt_len` generated vectors (each a learned gain times the token's embedding plus a learned
    bias; artifacts store token ids, not vectors); "inside" adds the first `target_slots` token
    embeddings onto generated slots 1..target_slots (the first shipped checkpoint's layout).

    end_slots (appended mode): learned vectors after the target's slots, shared by every edit (the
    trainer starts them at the embeddings of ".\n"), so the prefix reads as a finished statement
    rather than as the start of the text the prompt continues.
    """

    encoder: str = "minilm"
    key_dim: int = 128
    retriever_hidden: int = 512
    prompt_len: int = 4
    generator_hidden: int = 1024
    generator_input: str = "prompt+target"
    target_slots: int = 12  # target tokens the prompt carries (variant only)
    target_mode: str = "appended"
    end_slots: int = 0

    def __post_init__(self) -> None:
        if self.generator_input not in GENERATOR_INPUTS:
            raise ConfigError(f"generator_input={self.generator_input!r}; expected one of {GENERATOR_INPUTS}")
        if self.target_mode not in TARGET_MODES:
            raise ConfigError(f"target_mode={self.target_mode!r}; expected one of {TARGET_MODES}")
        if self.target_slots < 0 or (self.target_mode == "inside" and self.target_slots > self.prompt_len):
            raise ConfigError(
                f"target_slots={self.target_slots} must lie in [0, prompt_len={self.prompt_len}] "
                "for target_mode 'inside', and be >= 0 for 'appended'"
            )
        if self.end_slots < 0 or (self.end_slots and self.target_mode != "appended"):
            raise ConfigError(f"end_slots={self.end_slots}: must be >= 0, and 0 unless target_mode is 'appended'")
        for name in ("key_dim", "retriever_hidden", "prompt_len", "generator_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    @property
    def uses_target_embeddings(self) -> bool:
        return self.generator_input == "prompt+target"


@dataclass(frozen=True)
class TrainConfig:
    """RECIPE training schedule (retriever phase, then generator phase with the LLM frozen)."""

    retriever_steps: int = 3000
    retriever_batch: int = 512
    retriever_lr: float = 2e-3
    generator_steps: int = 600
    generator_batch: int = 16
    generator_lr: float = 1e-3
    locality_weight: float = 0.0
    # After the target: KL to the unedited model reading "prompt target" over its own greedy
    # continuation of `continuation_tokens` tokens (0: off), so what follows the answer reads right.
    continuation_weight: float = 0.0
    continuation_tokens: int = 12
    end_text: str = ".\n"  # initial value of the end slots (their embeddings), if the config has any
    # Retriever negatives built from the train rows: the edit's subject in another relation's prompt
    # and the edit's prompt with another subject must both pick the sentinel (subject locality).
    subject_negatives: bool = False
    # Question rows are also trained in chat form: the question as the user turn of the model's chat
    # template, the prefix before the user's words, the target as the start of the reply.
    chat_form: bool = False
    validate_every: int = 100
    checkpoint_every: int = 50
    validation_rows: int = 200
    seed: int = 0
