"""Score a RECIPE checkpoint with the trainer's own validation (oracle retrieval) on the held-back
train rows that `editstream train recipe` sets aside (seed-0 split of counterfact-train + zsre-train).

    .venv/bin/python bench/recipe_validate.py CHECKPOINT_DIR [--cache DIR]

Prints one JSON line: retrieval rates, teacher-forced reliability/generality, WILD answer-first and
exact, echo in 24 tokens, and the chat form on question rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editstream.data import load_edits
from editstream.methods.recipe.checkpoint import load_checkpoint
from editstream.methods.recipe.config import TrainConfig
from editstream.methods.recipe.train import encode_rows, split_rows, validate
from editstream.models import load_causal_lm, load_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="directory holding recipe.json and recipe.safetensors")
    p.add_argument("--cache", default="checkpoints/validate-cache", help="where the encoder embeddings are cached")
    args = p.parse_args()
    lm, encoder, schedule = load_causal_lm(), load_encoder(), TrainConfig()
    edits = [e for name in ("counterfact-train", "zsre-train") for e in load_edits(name)]
    rows = encode_rows(edits, encoder, Path(args.cache), statements=False, negatives=True)
    held_back, _ = split_rows(rows, schedule)  # the trainer's split
    net, _ = load_checkpoint(Path(args.checkpoint))
    print(json.dumps(validate(net.float().to(lm.device), lm, held_back)))


if __name__ == "__main__":
    main()
