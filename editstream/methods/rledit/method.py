"""The `rledit` method: a trained hypernetwork turns a batch of edits into weight shifts in one pass.

For a batch (the editor hands runs of consecutive journal entries, `batch` at a time), one
teacher-forced forward and backward pass on the current (already edited) model reads, at each key
position, every edited module's input `u` and the edit loss's gradient `delta` at its output; the
hypernetwork (`hypernet.ShiftNet`) turns them into value changes and the ridge solve into the shift
dW = U^T A. dW is a sum over key positions, so each edit's artifact is its own positions' rows of U
(float16) and A (float32: its entries are small) per module: applying adds A^T U to the weight,
removing subtracts it (exact up to rounding), and the weights are never touched by `compute`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from editstream.artifacts import Artifact
from editstream.config import config_from_dict, config_to_dict
from editstream.edits import EditRequest
from editstream.errors import ConfigError
from editstream.generation import positions
from editstream.methods.rledit.config import RLEditConfig
from editstream.methods.rledit.hypernet import ShiftNet, ridge_factors
from editstream.methods.rledit.null_space import projections
from editstream.methods.rome.weights import WeightEdit, delta, is_transposed, temporarily_added
from editstream.methods.scen.layers import decoder_layers
from editstream.metrics import encode_pairs
from editstream.models import LoadedLM

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).resolve().parents[2] / "assets" / "rledit-smollm2-135m"  # none ships yet (README)
FILES = ("rledit.json", "rledit.safetensors")
GPT2_NAMES = {"gate_proj": "c_fc", "up_proj": "c_fc", "down_proj": "c_proj"}


def edited_modules(model: nn.Module, config: RLEditConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every edited projection, layer by layer (GPT-2: `c_fc` for the input
    projections, `c_proj` for `down_proj`)."""
    layers = decoder_layers(model)
    low = int(0.6 * len(layers))
    band = list(config.layers) or list(range(low, max(int(0.8 * len(layers)), low + 1)))
    out = []
    for layer in band:
        if not 0 <= layer < len(layers):
            raise ConfigError(f"rledit layer {layer} is outside the model's {len(layers)} layers")
        mlp = layers[layer].mlp
        names = config.modules
        if not all(hasattr(mlp, n) for n in names):  # GPT-2's MLP: c_fc in, c_proj out
            names = tuple(dict.fromkeys(GPT2_NAMES.get(n, n) for n in names))
        for name in names:
            if not hasattr(mlp, name):
                raise ConfigError(f"{type(mlp).__name__} has no {name!r}; rledit edits {config.modules}")
            out.append((f"{layer}.{name}", getattr(mlp, name)))
    return out


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or a GPT-2 Conv1D (whose weight is (in, out))."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


class Hypernets(nn.Module):
    """One `ShiftNet` per distinct weight shape, and which net and index serve each edited module."""

    def __init__(self, shapes: Sequence[tuple[int, int]], config: RLEditConfig) -> None:
        super().__init__()
        kinds = sorted(set(shapes))
        counts = {k: sum(s == k for s in shapes) for k in kinds}
        c = config
        self.nets = nn.ModuleDict(
            {f"{i}x{o}": ShiftNet(i, o, counts[(i, o)], c.rank, c.blocks, c.init_lr, c.init_lambda) for i, o in kinds}
        )
        seen: dict[tuple[int, int], int] = {}
        self.route: list[tuple[str, int]] = []
        for s in shapes:
            self.route.append((f"{s[0]}x{s[1]}", seen.get(s, 0)))
            seen[s] = seen.get(s, 0) + 1
        # per module, the projection its keys go through (null_space.py); measured, not trained
        self.projections: list[torch.Tensor] | None = None

    def factors(self, j: int, u: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, A) of module `j` for inputs u and output gradients grad: its shift is dW = K^T A, K the
        keys (u, projected when `projections` are set), A (N, d_out) their ridge-solved values."""
        name, m = self.route[j]
        net = self.nets[name]
        keys = u if self.projections is None else u @ self.projections[j]
        return keys, ridge_factors(keys, net.values(u, grad, m), net.log_lambda[m])


class KeyReader:
    """Per edited module, the inputs u and loss gradients delta at the key positions of a batch."""

    def __init__(self, lm: LoadedLM, modules: Sequence[nn.Module], where: str) -> None:
        if where not in ("answer", "all"):
            raise ConfigError(f"rledit positions {where!r}: expected 'answer' or 'all'")
        self.lm, self.modules, self.where = lm, list(modules), where

    def read(self, edits: Sequence[EditRequest]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """([u_j (N, d_in)], [delta_j (N, d_out)], owner (N,): the edit each key position belongs to)."""
        batch = encode_pairs(self.lm.tokenizer, [e.prompt for e in edits], [e.target for e in edits])
        dev = self.lm.device
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        zeros: list[torch.Tensor | None] = [None] * len(self.modules)

        def hook(j: int):
            def read(_module, args, out):
                inputs[j] = args[0].detach()
                zeros[j] = torch.zeros_like(out, requires_grad=True)  # d loss / d zeros = d loss / d out
                return out + zeros[j]

            return read

        handles = [m.register_forward_hook(hook(j)) for j, m in enumerate(self.modules)]
        try:
            with torch.enable_grad():
                loss = answer_nll(self.lm, ids, mask, batch.answer_ids, batch.answer_start)
                grads = torch.autograd.grad(loss, zeros)
        finally:
            for h in handles:
                h.remove()
        rows, cols = key_positions(mask, batch.answer_ids, batch.answer_start, self.where)
        return [x[rows, cols].float() for x in inputs], [g[rows, cols].float() for g in grads], rows


def answer_nll(
    lm: LoadedLM, ids: torch.Tensor, mask: torch.Tensor, answers: Sequence[Sequence[int]], starts: Sequence[int]
) -> torch.Tensor:
    """Sum over rows of the mean negative log-likelihood of each row's answer tokens. The LM head
    runs only at the positions that predict an answer token: over a 49k vocabulary it is most of a
    small model's forward and backward."""
    hidden = lm.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    rows, cols = key_positions(mask, answers, starts, "answer")
    logits = lm.model.get_output_embeddings()(hidden[rows, cols]).float()
    target = torch.tensor([t for a in answers for t in a], device=logits.device)
    weight = torch.tensor([1.0 / len(a) for a in answers for _ in a], device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") * weight).sum()


def key_positions(
    mask: torch.Tensor, answers: Sequence[Sequence[int]], starts: Sequence[int], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the key positions: those predicting each answer token, or every real token."""
    if where == "all":
        rows, cols = mask.nonzero(as_tuple=True)
        return rows, cols
    pairs = [(i, s - 1 + k) for i, (a, s) in enumerate(zip(answers, starts, strict=True)) for k in range(len(a))]
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=mask.device)
    cols = torch.tensor([c for _, c in pairs], dtype=torch.long, device=mask.device)
    return rows, cols


def new_hypernets(lm: LoadedLM, config: RLEditConfig) -> Hypernets:
    """Untrained hypernetworks for `lm`'s edited modules (training starts from these)."""
    return Hypernets([shape_of(m) for _, m in edited_modules(lm.model, config)], config).to(lm.device)


def project_keys(nets: Hypernets, lm: LoadedLM, config: RLEditConfig) -> None:
    """Set `nets.projections` as `config.null_space` asks (once: the statistics are cached on disk)."""
    if config.null_space > 0 and nets.projections is None:
        c = config
        named = edited_modules(lm.model, c)
        nets.projections = projections(lm, named, c.null_space, c.null_space_corpus, c.null_space_tokens)


def save_hypernets(nets: Hypernets, config: RLEditConfig, directory: Path, info: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in nets.state_dict().items()}
    save_file(state, str(directory / FILES[1]))
    (directory / FILES[0]).write_text(json.dumps({"config": config_to_dict(config), **info}, indent=2))


def load_hypernets(lm: LoadedLM, directory: Path | str | None) -> tuple[Hypernets, RLEditConfig, dict]:
    """The hypernetworks trained for `lm` (default: the packaged ones), checked against its shapes."""
    path = Path(directory) if directory else PACKAGED
    meta_path = path / FILES[0]
    if not meta_path.is_file():
        raise ConfigError(
            f"no RLEdit hypernetwork at {path} ({FILES[0]} missing); train one for this model with "
            "`editstream train rledit --out DIR` and pass --option checkpoint=DIR"
        )
    meta = json.loads(meta_path.read_text())
    config = config_from_dict(RLEditConfig, meta["config"])
    nets = new_hypernets(lm, config)
    try:
        nets.load_state_dict(load_file(str(path / FILES[1])))
    except RuntimeError as exc:
        raise ConfigError(f"RLEdit hypernetwork at {path} does not fit {lm.name}'s edited modules: {exc}") from exc
    if meta.get("llm_fingerprint") not in (None, lm.fingerprint):
        log.warning("RLEdit hypernetwork was trained on %s, serving %s", meta.get("llm"), lm.name)
    return nets.eval().requires_grad_(False), config, meta


class RLEdit(WeightEdit):
    """Lifelong weight edits from a hypernetwork trained on edit trajectories (RLEdit)."""

    name = "rledit"
    sequential = True
    batch_edits = True

    def __init__(self, lm: LoadedLM, nets: Hypernets, config: RLEditConfig) -> None:
        super().__init__(lm)
        self.config, self.nets = config, nets
        named = edited_modules(lm.model, config)
        self.names = [n for n, _ in named]
        self.modules = [m for _, m in named]
        self.reader = KeyReader(lm, self.modules, config.positions)

    @classmethod
    def build(
        cls,
        lm: LoadedLM,
        checkpoint: str | Path | None = None,
        batch: int | None = None,
        null_space: float | None = None,
    ) -> RLEdit:
        """The hypernetworks at `checkpoint` with their config; `batch` and `null_space` override it
        (a hypernetwork trained without the projection can be served with it, for comparison)."""
        nets, config, _ = load_hypernets(lm, checkpoint)
        given = {"batch": batch, "null_space": null_space}
        overrides = {k: v for k, v in given.items() if v is not None}
        if overrides:
            config = config_from_dict(RLEditConfig, {**config_to_dict(config), **overrides})
        return cls(lm, nets, config)

    def compute(self, edits: Sequence[EditRequest]) -> list[Artifact]:
        """Artifacts of `edits` in batches of `config.batch`, each solved on the model the earlier
        batches changed (as a replica will have it); the weights are restored bit for bit after."""
        out: list[Artifact] = []
        size = self.config.batch
        with temporarily_added([(m, torch.zeros_like(m.weight)) for m in self.modules]):
            for i in range(0, len(edits), size):
                batch = self._solve(list(edits[i : i + size]))
                out += batch
                for artifact in batch if i + size < len(edits) else ():
                    self._attach(artifact)  # weights only: restored when the block ends
        return out

    def _solve(self, edits: list[EditRequest]) -> list[Artifact]:
        project_keys(self.nets, self.lm, self.config)  # on the first edit, not when a replica starts
        u, grads, owner = self.reader.read(edits)
        with torch.no_grad():
            factors = [self.nets.factors(j, u[j], grads[j]) for j in range(len(self.modules))]
        out = []
        for i, edit in enumerate(edits):
            rows = owner == i
            tensors: dict[str, torch.Tensor] = {}
            for j, (keys, values) in enumerate(factors):
                tensors[f"u{j}"] = keys[rows].half().cpu().contiguous()
                tensors[f"a{j}"] = values[rows].cpu().contiguous()  # float32: its entries are ~1e-5
            out.append(self.new_artifact(edit, tensors, modules=self.names))
        return out

    def _changes(self, artifact: Artifact) -> list[tuple[nn.Module, torch.Tensor]]:
        if artifact.meta.get("modules") != self.names:
            raise ConfigError(
                f"artifact {artifact.edit_id} edits {artifact.meta.get('modules')}, this rledit edits {self.names}"
            )
        dev = self.lm.device
        return [
            (m, delta(m, artifact.tensors[f"a{j}"].to(dev).T, artifact.tensors[f"u{j}"].to(dev).T))
            for j, m in enumerate(self.modules)
        ]
