"""Resumable training state: networks and optimiser moments in safetensors, counters in JSON.

A run writes `train_state.safetensors` (each network's weights as `net.<name>.<key>`, or
`net.<key>` for one named "", each optimiser's per-parameter state as `opt.<name>.<id>.<key>`)
and `train_state.json` (the counters and history the caller keeps, and the config the run was
made with). A resumed run with
another config ignores the state and starts over, saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


def _prefix(name: str) -> str:
    return f"net.{name}." if name else "net."  # one unnamed network: the layout RECIPE runs began with


def state_paths(out: Path) -> tuple[Path, Path]:
    return out / "train_state.safetensors", out / "train_state.json"


def save_state(
    out: Path, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any]
) -> None:
    """Write the state atomically (the weights file is renamed into place)."""
    tensors = {f"{_prefix(name)}{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    for name, opt in optimizers.items():
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt.{name}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    weights, meta = state_paths(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.rename(weights)
    meta.write_text(json.dumps(state, indent=1))


def load_state(
    out: Path, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], config: Any
) -> dict[str, Any] | None:
    """Load a saved state into `nets` and `optimizers` and return its JSON part, or None when there
    is none or it was made with another `config` (the JSON's "config" entry)."""
    weights, meta = state_paths(out)
    if not (weights.is_file() and meta.is_file()):
        return None
    saved = json.loads(meta.read_text())
    if saved.get("config") != config:
        log.warning("ignoring train state in %s: it was made with another config", out)
        return None
    tensors = load_file(str(weights))
    for name, net in nets.items():
        prefix = _prefix(name)
        net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for key, v in tensors.items():
            parts = key.split(".")
            if parts[:2] == ["opt", name]:
                sd["state"].setdefault(int(parts[2]), {})[parts[3]] = v
        opt.load_state_dict(sd)
    return saved
