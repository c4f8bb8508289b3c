"""RECIPE's trainable parts: the retriever (key/query heads + Knowledge Sentinel) and the prompt generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from editstream.methods.recipe.config import RecipeConfig


class _ResidualHead(nn.Module):
    """x -> normalize(W x + MLP(x)); W starts orthogonal and the MLP at zero, so training starts
    from the encoder's own cosine similarity."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x) + self.mlp(x), dim=-1)


class Retriever(nn.Module):
    """Keys from edit prompts, queries from incoming prompts; the sentinel is a per-query threshold.

    A query retrieves its best key only if that key scores above the query's score with the
    sentinel (RECIPE's Knowledge Sentinel), so unrelated prompts fire nothing.
    """

    def __init__(self, enc_dim: int, config: RecipeConfig) -> None:
        super().__init__()
        self.key_head = _ResidualHead(enc_dim, config.retriever_hidden, config.key_dim)
        self.query_head = _ResidualHead(enc_dim, config.retriever_hidden, config.key_dim)
        with torch.no_grad():
            self.query_head.proj.weight.copy_(self.key_head.proj.weight)
        self.sentinel = nn.Parameter(torch.zeros(config.key_dim))
        self.log_scale = nn.Parameter(torch.tensor(3.0))  # logit scale exp(3) ~ 1/0.05

    def keys(self, r: torch.Tensor) -> torch.Tensor:
        return self.key_head(r)

    def queries(self, r: torch.Tensor) -> torch.Tensor:
        return self.query_head(r)

    def sentinel_score(self, q: torch.Tensor) -> torch.Tensor:
        """The per-query threshold: similarity of each query with the sentinel, shape (n,)."""
        return q @ torch.tanh(self.sentinel)


class PromptGenerator(nn.Module):
    """Knowledge representation -> continuous prompt vectors in the LLM's embedding space.

    Paper form: `prompt_len` vectors from an MLP over the statement's representation. Variant: the
    MLP reads the prompt's representation plus the mean target-token embedding, and the target's
    own token embeddings enter the prefix too: appended as extra slots (`target_mode` "appended")
    or added onto generated slots ("inside"). At initialisation the prefix reads like the target
    written out.
    """

    def __init__(self, enc_dim: int, d_llm: int, config: RecipeConfig, embed_mean: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.d_llm = d_llm
        in_dim = enc_dim + (d_llm if config.uses_target_embeddings else 0)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.generator_hidden),
            nn.GELU(),
            nn.Linear(config.generator_hidden, config.prompt_len * d_llm),
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.base = nn.Parameter(embed_mean.detach().clone().float().expand(config.prompt_len, d_llm).clone())
        n = config.target_slots if config.uses_target_embeddings else 0
        self.target_gain = nn.Parameter(torch.ones(n))
        if self.appends_targets:
            self.target_bias = nn.Parameter(torch.zeros(n, d_llm))
            self.end = nn.Parameter(torch.zeros(config.end_slots, d_llm))

    @property
    def appends_targets(self) -> bool:
        return self.config.uses_target_embeddings and self.config.target_mode == "appended"

    def forward(self, r: torch.Tensor, target_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The generated vectors (B, prompt_len, d) for representations r (B, enc_dim).

        target_embeds: (B, target_slots, d_llm), zero rows past a target's end (variant only).
        """
        config = self.config
        if config.uses_target_embeddings:
            if target_embeds is None:
                raise ValueError("this generator reads target token embeddings; none were given")
            mask = (target_embeds.abs().sum(-1, keepdim=True) > 0).float()
            t_mean = (target_embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            x = torch.cat([r, t_mean], dim=-1)
        else:
            x = r
        prompts = self.base + self.mlp(x).view(-1, config.prompt_len, self.d_llm)
        if config.uses_target_embeddings and config.target_mode == "inside" and config.target_slots:
            n = config.target_slots
            slots = slice(1, 1 + n) if n < config.prompt_len else slice(0, None)
            prompts = prompts.clone()
            prompts[:, slots] = prompts[:, slots] + self.target_gain.view(1, -1, 1) * target_embeds
        return prompts

    def prefix(self, generated: torch.Tensor, target_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full prefix and its mask: generated vectors, then (appended mode) present target slots
        and the end slots."""
        ones = torch.ones(generated.shape[:2], dtype=torch.long, device=generated.device)
        if not self.appends_targets:
            return generated, ones
        present = (target_embeds.abs().sum(-1) > 0).long()
        slots = self.target_gain.view(1, -1, 1) * target_embeds + self.target_bias * present.unsqueeze(-1)
        end = self.end.to(generated.dtype).expand(len(generated), -1, -1)
        end_mask = torch.ones(end.shape[:2], dtype=torch.long, device=generated.device)
        return torch.cat([generated, slots, end], dim=1), torch.cat([ones, present, end_mask], dim=1)


def target_token_ids(tokenizer, targets: list[str], slots: int) -> torch.Tensor:
    """Each target's first `slots` token ids, padded with -1: (B, slots), int64."""
    out = torch.full((len(targets), slots), -1, dtype=torch.long)
    for i, target in enumerate(targets):
        ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"][:slots]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def embed_ids(lm_embed: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of token ids, zero rows where the id is -1: (B, slots, d)."""
    ids = ids.to(lm_embed.weight.device).long()
    with torch.no_grad():
        vectors = lm_embed.weight[ids.clamp(min=0)]
    return vectors * (ids >= 0).unsqueeze(-1).to(vectors.dtype)


def target_token_embeddings(lm_embed: nn.Embedding, tokenizer, targets: list[str], slots: int) -> torch.Tensor:
    """The LLM's input embeddings of each target's first `slots` tokens, zero-padded: (B, slots, d)."""
    return embed_ids(lm_embed, target_token_ids(tokenizer, targets, slots))


class RecipeNet(nn.Module):
    """Retriever and generator together: what a RECIPE checkpoint holds."""

    def __init__(self, enc_dim: int, d_llm: int, config: RecipeConfig, embed_mean: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.retriever = Retriever(enc_dim, config)
        self.generator = PromptGenerator(enc_dim, d_llm, config, embed_mean)
