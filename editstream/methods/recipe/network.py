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
    """Knowledge representation -> `prompt_len` continuous prompt vectors in the LLM's embedding space.

    In the variant, slot j (1 <= j <= target_slots) also receives a learned multiple of the j-th
    target token's input embedding: at initialisation the prefix reads like the target written out.
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

    def forward(self, r: torch.Tensor, target_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """r: (B, enc_dim); target_embeds: (B, target_slots, d_llm), zero rows past a target's end.

        Returns prompts of shape (B, prompt_len, d_llm).
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
        if config.uses_target_embeddings and config.target_slots:
            slots = slice(1, 1 + config.target_slots) if config.target_slots < config.prompt_len else slice(0, None)
            gains = self.target_gain.view(1, -1, 1)
            prompts = prompts.clone()
            prompts[:, slots] = prompts[:, slots] + gains * target_embeds
        return prompts


def target_token_embeddings(lm_embed: nn.Embedding, tokenizer, targets: list[str], slots: int) -> torch.Tensor:
    """The LLM's input embeddings of each target's first `slots` tokens, zero-padded: (B, slots, d)."""
    d = lm_embed.weight.shape[1]
    out = torch.zeros(len(targets), slots, d, device=lm_embed.weight.device)
    for i, target in enumerate(targets):
        ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"][:slots]
        if ids:
            with torch.no_grad():
                out[i, : len(ids)] = lm_embed.weight[torch.tensor(ids, device=lm_embed.weight.device)]
    return out


class RecipeNet(nn.Module):
    """Retriever and generator together: what a RECIPE checkpoint holds."""

    def __init__(self, enc_dim: int, d_llm: int, config: RecipeConfig, embed_mean: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.retriever = Retriever(enc_dim, config)
        self.generator = PromptGenerator(enc_dim, d_llm, config, embed_mean)
