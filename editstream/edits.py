"""The edit request: one fact to teach the model, with the probes that check it."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field


def default_edit_id(prompt: str, target: str) -> str:
    """The idempotency key used when a client gives none: a hash of (prompt, target)."""
    digest = hashlib.sha256(f"{prompt}\x1f{target}".encode()).hexdigest()
    return f"e-{digest[:20]}"


def normalize_prompt(prompt: str) -> str:
    """The form under which two prompts count as the same question (for supersede): Unicode NFKC
    (composed and decomposed accents, ligatures and full-width letters agree), white space
    collapsed, case folded."""
    return " ".join(unicodedata.normalize("NFKC", prompt).split()).casefold()


@dataclass(frozen=True)
class LocalityProbe:
    """An unrelated prompt whose answer must not change, with a reference continuation."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact: after the edit, `prompt` should be answered with `target`."""

    prompt: str
    target: str
    edit_id: str = ""
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.edit_id:
            object.__setattr__(self, "edit_id", default_edit_id(self.prompt, self.target))

    @property
    def is_question(self) -> bool:
        """Whether the prompt is a question (then it can also be asked as a chat turn)."""
        return self.prompt.rstrip().endswith("?")

    @property
    def statement(self) -> str:
        """The fact as one sentence: prompt followed by target."""
        return f"{self.prompt} {self.target}"
