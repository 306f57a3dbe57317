"""Loading base models: a local transformers folder, or a built-in model (see :mod:`lmadapt.models.builtins`).

Nothing is ever fetched from the Hugging Face Hub: every transformers call passes
``local_files_only=True``, names are resolved here before transformers sees them, and
``HF_HUB_OFFLINE=1`` is set (unless the user set it) when ``lmadapt`` is imported.

Base weights are read from safetensors only: a folder that holds only ``pytorch_model.bin`` (a pickle) is
refused before anything is opened, unless ``model.allow_pickle`` is true. The folder's ``config.json`` and
the safetensors headers are checked first (:func:`check_model_folder`), so a damaged file is named.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmadapt.config import option
from lmadapt.errors import ModelError
from lmadapt.hardware import warn_if_slow
from lmadapt.jsonfile import JsonFileError, read_json, read_json_object
from lmadapt.models.builtins import (
    BUILTINS,
    find_builtin,
    installed_version,
    read_source,
    resolve_model_path,
)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFE_WEIGHTS, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")


@dataclass
class ModelConfig:
    """The ``model:`` section: which base model to load, in which dtype, on which device."""

    name_or_path: str = option("smollm2-135m-instruct",
                               "A built-in model name (see lmadapt.models.builtins.BUILTINS) or a local folder holding a "
                               "transformers causal LM (config.json, weights, tokenizer). The Hub is never used.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "dtype of the loaded base weights. auto, when training: bf16 if train.precision is bf16 and the "
        "method keeps the base frozen (autocast would cast the frozen weights to bf16 on every forward anyway; "
        "this halves their memory), else fp32; when loading for inference: bf16 on a CUDA GPU that supports "
        "it, else fp32.")
    device: str = option("auto", "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = option(False, "Allow model code shipped inside the model folder to run. "
                                            "Only for folders you trust.")
    cache_dir: str | None = option(None, "Where built-in models are converted to safetensors; "
                                         "default $LMADAPT_CACHE or ~/.cache/lmadapt.")
    attn_implementation: str | None = option("sdpa", "Attention kernel passed to transformers "
                                                     "(sdpa, eager, ...); null = transformers' default.")
    allow_pickle: bool = option(False, "Also load base weights from pytorch_model.bin, a pickle: unpickling a "
                                       "crafted file can run code on this machine. Only for folders whose source "
                                       "you trust; otherwise only safetensors weights are read.")

    def check(self) -> list[str]:
        """Problems with the section, each starting with the field name."""
        problems = []
        if not _DEVICE_RE.match(self.device):
            problems.append(f"device: {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if not str(self.name_or_path).strip():
            problems.append("name_or_path: empty; give a built-in name "
                            f"({', '.join(BUILTINS)}) or a local model folder")
        return problems


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; other specs are checked against the machine."""
    if not _DEVICE_RE.match(spec):
        raise ModelError(f"device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ModelError(f"device {spec!r} was asked for, but this machine has {count} CUDA GPU(s); "
                             f"use device=cpu or device=auto")
    if device.type == "mps" and not has_mps:
        raise ModelError(f"device {spec!r} was asked for, but MPS is not available; use device=cpu or auto")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32; ``fp32``/``bf16``/``fp16`` as named."""
    if spec == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if spec not in _DTYPES:
        raise ModelError(f"dtype {spec!r} is not one of auto, fp32, bf16, fp16")
    return _DTYPES[spec]


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False,
                   cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or built-in, with a pad token (eos when it has none)."""
    folder = resolve_model_path(name_or_path, cache_dir)
    _json_object(folder / "config.json")  # transformers reads it first, and fails on a non-object with a TypeError
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        bad_file = _tokenizer_problem(folder)
        raise ModelError(bad_file or f"could not load the tokenizer from {folder}: {exc}") from exc
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelError(f"the tokenizer in {folder} has no pad, eos or unk token to pad with; "
                             f"add a pad token to it (tokenizer.add_special_tokens) and save it again")
        tok.pad_token = fallback
    return tok


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local folder or a built-in: eval mode, on the resolved device and dtype."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    warn_if_slow(dtype, device, "model.dtype")
    folder = resolve_model_path(cfg.name_or_path, cfg.cache_dir)
    check_model_folder(folder, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=dtype, local_files_only=True, trust_remote_code=cfg.trust_remote_code,
                                  use_safetensors=None if cfg.allow_pickle else True)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except pickle.UnpicklingError as exc:  # allow_pickle: torch.load(weights_only=True) refused the file
        raise ModelError(f"the pickled weights in {folder} cannot be read as plain tensors (torch.load with "
                         f"weights_only=True refused them: the file is damaged, or holds other objects); convert "
                         f"them to safetensors in a trusted environment, or copy the model again") from exc
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as exc:
        hint = (f" (model.attn_implementation={cfg.attn_implementation!r}: try eager or null)"
                if cfg.attn_implementation and "attn" in str(exc).lower() else "")
        raise ModelError(f"could not load a causal language model from {folder}: {exc}{hint}") from exc
    model.to(device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_model_folder(folder: str | Path, *, allow_pickle: bool = False) -> None:
    """Raise :class:`ModelError`, naming the file, unless ``folder`` has a config.json holding a JSON object and
    whole safetensors weights (or, with ``allow_pickle``, pytorch_model.bin pickles): checked before
    transformers reads anything, so that a pickle is refused before it is opened.

    A safetensors file is checked by opening its header, which also finds a truncated file (the header's
    offsets must cover the file exactly); the tensor bytes themselves are not read.
    """
    folder = Path(folder)
    _json_object(folder / "config.json")
    safe = _safetensors_files(folder)
    for path in safe:
        _check_safetensors(path)
    if safe:
        return
    pickles = [name for name in _PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickles and not allow_pickle:
        raise ModelError(f"{folder} holds only {pickles[0]}, a pickle, which can run code when loaded; convert it "
                         f"to safetensors (in a trusted environment, load it with transformers and call "
                         f"model.save_pretrained(folder), which writes {_SAFE_WEIGHTS}), or set "
                         f"model.allow_pickle=true if you trust its source")
    if not pickles:
        raise ModelError(f"{folder} holds no model weights: it needs {_SAFE_WEIGHTS} (or {_SAFE_INDEX} and the "
                         f"shards it lists), as model.save_pretrained(folder) writes them")


def _json_object(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except JsonFileError as exc:
        raise ModelError(f"{exc}; fix it, or copy or save the model again") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of ``folder``: the shards its index lists, or model.safetensors."""
    if (folder / _SAFE_INDEX).is_file():
        weight_map = _json_object(folder / _SAFE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{folder / _SAFE_INDEX}: 'weight_map' must map each weight's name to its shard file; "
                             f"copy or save the model again")
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / _SAFE_WEIGHTS] if (folder / _SAFE_WEIGHTS).is_file() else []


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path} is missing (listed in {_SAFE_INDEX}); copy or save the model again")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is truncated or corrupt ({exc}); copy or save it again") from None


def _tokenizer_problem(folder: Path) -> str | None:
    """What is wrong with the first of the tokenizer's JSON files that cannot be read, if one cannot
    (transformers' own message does not name the file)."""
    for name in _TOKENIZER_JSON:
        if (folder / name).is_file():
            try:
                read_json(folder / name)
            except JsonFileError as exc:
                return f"{exc}; the tokenizer cannot be loaded: copy or save it again"
    return None


def model_display_name(cfg: ModelConfig | str) -> str:
    """The name adapters and reports record: the built-in name, or the model folder's absolute path."""
    name = cfg.name_or_path if isinstance(cfg, ModelConfig) else str(cfg)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return find_builtin(name) or name


def model_source(cfg: ModelConfig | str) -> dict[str, Any]:
    """What the model is, for reports: name, and for a built-in its human name, package, version, quantization."""
    name = model_display_name(cfg)
    if find_builtin(name) is not None:
        b = BUILTINS[find_builtin(name)]  # type: ignore[index]
        return {"name": b.name, "display_name": b.display_name, "package": b.package,
                "version": installed_version(b.package) or b.version, "quantization": b.quantization,
                "licence": b.licence}
    return {"name": name, **(read_source(name) or {})}
