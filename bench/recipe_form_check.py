"""Does generating RECIPE's prompt vectors when an edit fires change any answer?

Before 2026-12-01 an artifact stored the prompt vectors (generated from the float32 encoding at
compute time, then rounded to float16); now it stores the float16 encoding and the replica generates
the vectors when the edit fires. This applies the same edits to two replicas that differ only in
that, asks every prompt and paraphrase (greedy, cut as WILD cuts, the served path) and counts the
answers that differ; JSON to stdout. Usage:
  .venv/bin/python bench/recipe_form_check.py --data counterfact,zsre --limit 200 > OUT.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence

import torch

from editstream.bench.provenance import provenance
from editstream.data import load_edits
from editstream.methods.recipe.method import Recipe
from editstream.methods.recipe.network import embed_ids
from editstream.models import load_causal_lm
from editstream.replica import Replica


class StoredVectors(Recipe):
    """The earlier form: vectors from the float32 encoding of the prompt, rounded to float16."""

    def _prefix(self, edit_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        packed = [self._applied[e] for e in edit_ids]
        r = self.retrieval.encode([p.get("prompt") for p in packed])
        targets = embed_ids(self.lm.model.get_input_embeddings(), torch.stack([p.tensor("target_ids") for p in packed]))
        with torch.inference_mode():
            generated = self.net.generator(r, targets).half().float()
            return self.net.generator.prefix(generated, targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="counterfact,zsre")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=50)
    args = ap.parse_args()
    lm = load_causal_lm()
    now = Recipe.build(lm)
    before = StoredVectors(lm, now.retrieval)
    doc = {"command": " ".join(sys.argv), "sets": {}}
    for name in args.data.split(","):
        edits = load_edits(name)
        random.Random(0).shuffle(edits)
        edits = edits[: args.limit]
        artifacts = now.compute(edits)
        prompts = [e.prompt for e in edits] + [p for e in edits for p in e.paraphrases]
        answers = {}
        for label, method in (("generated", now), ("stored", before)):
            now.reset()  # the two share one retriever (index): one holds the edits at a time
            before.reset()
            for a in artifacts:
                method.apply(a)
            replica = Replica(method)
            answers[label] = []
            for i in range(0, len(prompts), 32):
                answers[label] += replica.generate(prompts[i : i + 32], args.tokens, until_cut=True)
        differ = [
            {"prompt": p, "generated": g, "stored": s}
            for p, g, s in zip(prompts, answers["generated"], answers["stored"], strict=True)
            if g != s
        ]
        doc["sets"][name] = {"edits": len(edits), "asked": len(prompts), "differ": len(differ), "examples": differ[:10]}
        print(name, len(prompts), "asked,", len(differ), "differ", file=sys.stderr)
    print(json.dumps({**doc, **provenance()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
