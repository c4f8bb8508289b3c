"""RECIPE checkpoints: `recipe.json` (config, shapes, provenance) + `recipe.safetensors` (weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editstream.config import config_from_dict, config_to_dict
from editstream.errors import ConfigError
from editstream.methods.recipe.config import RecipeConfig
from editstream.methods.recipe.network import RecipeNet

PACKAGED = Path(__file__).resolve().parents[2] / "assets" / "recipe-smollm2-135m-minilm"


def save_checkpoint(net: RecipeNet, directory: Path, info: dict[str, Any], half: bool = True) -> None:
    """Write the network's weights (float16 if `half`) and a JSON description beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / "recipe.safetensors"))
    meta = {
        "config": config_to_dict(net.config),
        "enc_dim": net.generator.mlp[0].in_features - (net.generator.d_llm if net.config.uses_target_embeddings else 0),
        "d_llm": net.generator.d_llm,
        **info,
    }
    (directory / "recipe.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(directory: Path | str | None = None) -> tuple[RecipeNet, dict[str, Any]]:
    """Load a RECIPE network (float32, eval mode); default: the checkpoint shipped in the package."""
    directory = Path(directory) if directory else PACKAGED
    meta_path = directory / "recipe.json"
    if not meta_path.is_file():
        raise ConfigError(
            f"no RECIPE checkpoint at {directory} (recipe.json missing); train one with "
            "`editstream train recipe --out DIR` or pass --checkpoint"
        )
    meta = json.loads(meta_path.read_text())
    config = config_from_dict(RecipeConfig, meta["config"])
    net = RecipeNet(meta["enc_dim"], meta["d_llm"], config, torch.zeros(meta["d_llm"]))
    state = load_file(str(directory / "recipe.safetensors"))
    if net.generator.appends_targets and "generator.end" not in state:  # checkpoints made before end slots
        state["generator.end"] = torch.zeros(0, meta["d_llm"])
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False), meta
