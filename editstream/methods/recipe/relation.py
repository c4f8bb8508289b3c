"""The relation gate: an edit fires only on prompts that ask its relation, not merely name its subject.

RECIPE's retriever reads whole prompts, and a prompt that is mostly a name ("X is famous for")
lands near every edit of X. The gate is a second key that ignores the subject: the query and the
edit's prompt, each with the edit's subject replaced by a placeholder, are encoded by the sentence
encoder and projected by a small learned map; the edit fires only if the two relation vectors agree
(cosine above a threshold). Where the edit's subject is not in the query (or not in its own prompt)
the gate has nothing to compare and leaves the retriever's decision alone.

Training uses the train splits only: the edit prompt and its paraphrase are positives; the same
subject in another row's prompt, and in relation-free templates (`GATE_NEGATIVES`, disjoint from
the evaluation's subject probes), are negatives. The threshold lets `keep` of held-out train
paraphrases through.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.methods.recipe.negatives import subject_swaps
from editstream.models import LoadedEncoder

log = logging.getLogger(__name__)

PLACEHOLDER = "someone"
GATE_FILES = ("relation-gate.json", "relation-gate.safetensors")
# Prompts that name a subject and ask nothing in particular; none is an evaluation probe
# (probes.SUBJECT_PROBES), which tests/test_probes.py checks.
GATE_NEGATIVES: tuple[str, ...] = (
    "Here is a short biography of {}:",
    "{} is a",
    "Facts about {}:",
    "Have you heard of {}?",
    "{} was",
    "What do you know about {}?",
    "Let me describe {}.",
    "{} has",
    "Everyone has heard of {}",
    "I want to learn about {}",
    "{}",
)


def mask_subject(text: str, subject: str) -> str | None:
    """`text` with `subject` (any case) replaced by the placeholder, or None if it does not occur."""
    if not subject or subject.casefold() not in text.casefold():
        return None
    return re.sub(re.escape(subject), PLACEHOLDER, text, flags=re.IGNORECASE)


@dataclass
class RelationGate:
    """A linear map of subject-masked sentence embeddings, and the cosine an edit needs to fire."""

    projection: torch.nn.Linear
    threshold: float
    info: dict[str, Any]
    # edit id -> its relation vector (an edit's prompt and subject never change), least recently
    # used first; bounded, so a replica serving a million edits keeps only those its queries hit lately
    _edits: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict, repr=False)
    cache_size: int = 100_000

    def vectors(self, encoder: LoadedEncoder, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            x = encoder.encode(list(texts)).to(self.projection.weight.device)
            return torch.nn.functional.normalize(self.projection(x), dim=-1)

    def agree(
        self,
        encoder: LoadedEncoder,
        queries: Sequence[str],
        edit_ids: Sequence[str],
        meta_of: Callable[[str], dict[str, Any]],
    ) -> list[bool]:
        """Per row: whether the query asks what the edit (its artifact meta: prompt, subject) asks;
        True where the gate cannot tell. An edit's relation vector is cached (up to `cache_size`
        edits, least recently used out) until `forget`; the queries and the edits not cached are
        encoded in one batch."""
        metas = [(i, meta_of(i)) for i in edit_ids]
        edits = [(i, m.get("prompt", ""), m.get("subject", "")) for i, m in metas]
        masked = [(mask_subject(q, s), mask_subject(p, s)) for q, (_, p, s) in zip(queries, edits, strict=True)]
        rows = [i for i, (q, p) in enumerate(masked) if q is not None and p is not None]
        out = [True] * len(queries)
        if not rows:
            return out
        wanted = {edits[i][0]: masked[i][1] for i in rows}
        missing = [(e, p) for e, p in wanted.items() if e not in self._edits]
        vectors = self.vectors(encoder, [masked[i][0] for i in rows] + [p for _, p in missing])
        q, fresh = vectors[: len(rows)], vectors[len(rows) :]
        self._edits.update({e: v for (e, _), v in zip(missing, fresh, strict=True)})
        for e in wanted:  # used now: newest last
            self._edits.move_to_end(e)
        cos = (q * torch.stack([self._edits[edits[i][0]] for i in rows])).sum(-1).tolist()
        for i, c in zip(rows, cos, strict=True):
            out[i] = c > self.threshold
        while len(self._edits) > self.cache_size:
            self._edits.popitem(last=False)
        return out

    def forget(self, edit_id: str) -> None:
        """Drop a removed edit's cached relation vector."""
        self._edits.pop(edit_id, None)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.projection.state_dict().items()}
        save_file(state, str(directory / GATE_FILES[1]))
        meta = {"threshold": self.threshold, "placeholder": PLACEHOLDER, **self.info}
        (directory / GATE_FILES[0]).write_text(json.dumps(meta, indent=2))


def load_gate(directory: Path, device: torch.device | str = "cpu") -> RelationGate | None:
    """The gate stored beside a RECIPE checkpoint, or None if the checkpoint has none."""
    meta_path, weights = (directory / name for name in GATE_FILES)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("placeholder") != PLACEHOLDER:
        raise ConfigError(f"{meta_path}: placeholder {meta.get('placeholder')!r}, this code masks with {PLACEHOLDER!r}")
    state = load_file(str(weights))
    out_dim, in_dim = state["weight"].shape
    projection = torch.nn.Linear(in_dim, out_dim)
    projection.load_state_dict(state)
    info = {k: v for k, v in meta.items() if k not in ("threshold", "placeholder")}
    return RelationGate(projection.to(device).eval().requires_grad_(False), float(meta["threshold"]), info)


def _examples(edits: Sequence[EditRequest], seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(masked prompt, masked paraphrase, masked other-relation prompt, masked relation-free prompt)."""
    rng = random.Random(seed)
    other, _ = subject_swaps(edits, seed=seed)
    rows: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
    for e, o in zip(edits, other, strict=True):
        paraphrases = [m for p in e.paraphrases if (m := mask_subject(p, e.subject)) is not None]
        texts = (
            mask_subject(e.prompt, e.subject),
            rng.choice(paraphrases) if paraphrases else None,
            mask_subject(o, e.subject),
            mask_subject(rng.choice(GATE_NEGATIVES).format(e.subject), e.subject),
        )
        if all(t is not None for t in texts):
            for column, text in zip(rows, texts, strict=True):
                column.append(text)
    return rows


def train_gate(
    encoder: LoadedEncoder,
    edits: Sequence[EditRequest],
    steps: int = 3000,
    dim: int = 128,
    temperature: float = 0.1,
    keep: float = 0.975,
    held_out: int = 800,
    seed: int = 0,
) -> RelationGate:
    """Fit the gate on train rows; the threshold passes `keep` of the held-out rows' paraphrases."""
    torch.manual_seed(seed)
    edits = list(edits)
    random.Random(seed).shuffle(edits)
    if len(edits) <= held_out:
        raise ConfigError(f"relation gate: {len(edits)} train rows, need more than held_out={held_out}")
    encode = [
        [encoder.encode(column) for column in _examples(part, seed)] for part in (edits[held_out:], edits[:held_out])
    ]
    (P, Q, N1, N2), held = encode
    projection = torch.nn.Linear(P.shape[1], dim)
    opt = torch.optim.Adam(projection.parameters(), lr=3e-3)

    def vec(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(projection(x), dim=-1)

    batch = min(256, len(P))
    for _ in tqdm(range(steps), desc="relation gate", unit="step"):
        idx = torch.randint(0, len(P), (batch,))
        logits = vec(P[idx]) @ torch.cat([vec(Q[idx]), vec(N1[idx]), vec(N2[idx])]).T / temperature
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p, q, n1, n2 = (vec(x) for x in held)
        pos, other, free = (p * q).sum(-1), (p * n1).sum(-1), (p * n2).sum(-1)
        threshold = float(torch.quantile(pos, 1.0 - keep))
    info = {
        "dim": dim,
        "steps": steps,
        "temperature": temperature,
        "keep": keep,
        "seed": seed,
        "train_rows": len(P),
        "held_out_rows": len(pos),
        "held_out_paraphrases_kept": round(float((pos > threshold).float().mean()), 4),
        "held_out_other_prompt_fires": round(float((other > threshold).float().mean()), 4),
        "held_out_relation_free_fires": round(float((free > threshold).float().mean()), 4),
    }
    log.info("relation gate: threshold %.3f, %s", threshold, info)
    return RelationGate(projection.eval().requires_grad_(False), threshold, info)
