"""Loading base models: a local transformers folder, or a built-in model (see :mod:`lmadapt.models.builtins`).

Nothing is ever fetched from the Hugging Face Hub: every transformers call passes
``local_files_only=True``, names are resolved here before transformers sees them, and
``HF_HUB_OFFLINE=1`` is set (unless the user set it) when ``lmadapt`` is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmadapt.config import option
from lmadapt.errors import ModelError
from lmadapt.hardware import warn_if_slow
from lmadapt.models.builtins import (
    BUILTINS,
    find_builtin,
    installed_version,
    read_source,
    resolve_model_path,
)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the tokenizer from {folder}: {exc}") from exc
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
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=dtype, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        hint = (f" (model.attn_implementation={cfg.attn_implementation!r}: try eager or null)"
                if cfg.attn_implementation and "attn" in str(exc).lower() else "")
        raise ModelError(f"could not load a causal language model from {folder}: {exc}{hint}") from exc
    model.to(device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
