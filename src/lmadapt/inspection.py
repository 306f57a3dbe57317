"""What a folder (or a built-in model name) holds, read from its JSON/YAML files and safetensors headers only.

:func:`inspect_path` is :func:`lmadapt.api.inspect` and ``lmadapt inspect``. It recognises, in this order:
an adapter folder (``adapter_config.json``), a VAS value model (``lmadapt_value.json``), a helper model
(``lmadapt_helper.json``), any other model folder (``config.json``; a merged one shows its
``lmadapt_merge.json``), the run folders of ``lmadapt train``, ``make-helper`` and ``vas-train``
(``config.yaml``, ``adapter/``, ``model/``, ``values/``, ``checkpoints/``), and a built-in model name.
Nothing is converted or loaded; a file that cannot be read is an :class:`LmadaptError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmadapt.adapters.format import (
    CONFIG_NAME,
    adapter_metadata,
    adapter_shapes,
    read_adapter_info,
)
from lmadapt.config import read_yaml
from lmadapt.decoding.value_model import VALUE_JSON
from lmadapt.errors import LmadaptError
from lmadapt.jsonfile import JsonFileError, read_json, read_json_object
from lmadapt.models.builtins import (
    BUILTINS,
    SOURCE_FILE,
    default_cache_dir,
    find_builtin,
    read_source,
)
from lmadapt.models.loading import model_source
from lmadapt.recipes.helper_model import INFO_FILE as HELPER_JSON
from lmadapt.training.checkpoint import checkpoint_dirs

MERGE_JSON = "lmadapt_merge.json"  # written by lmadapt.api.merge
RUN_KINDS = {"train_run": "lmadapt train", "make_helper_run": "lmadapt make-helper",
             "vas_train_run": "lmadapt vas-train"}


def inspect_path(path: str | Path) -> dict[str, Any]:
    """What ``path`` holds, as a dict whose ``kind`` says what it is (see the module docstring)."""
    folder = Path(path)
    if not folder.exists() and find_builtin(str(path)) is not None:
        return _builtin(find_builtin(str(path)))  # type: ignore[arg-type]
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise LmadaptError(f"{path} {what}: give an adapter, model, value-model or run folder, or a built-in "
                           f"model name ({', '.join(BUILTINS)})")
    if (folder / CONFIG_NAME).is_file():
        return inspect_adapter(folder)
    if (folder / VALUE_JSON).is_file():
        return {**_model(folder), "kind": "value_model",
                "value_model": _json(folder / VALUE_JSON, read_json_object, "train the value model again")}
    if (folder / HELPER_JSON).is_file():
        info = _json(folder / HELPER_JSON, read_json_object, "make the helper model again")
        return {**_model(folder), "kind": "helper_model",
                "helper": {k: v for k, v in info.items() if k not in ("config", "data")}}
    if (folder / "config.json").is_file():
        return _model(folder)
    kind = _run_kind(folder)
    if kind is None:
        raise LmadaptError(f"{folder}: not an adapter folder ({CONFIG_NAME}), a model folder (config.json, with "
                           f"{VALUE_JSON} or {HELPER_JSON} for value and helper models), or a run folder of "
                           f"{', '.join(RUN_KINDS.values())} (config.yaml)")
    return _run(folder, kind)


def inspect_adapter(path: Path) -> dict[str, Any]:
    """An adapter folder: its method, base model, how its data was rendered, tensors and header metadata."""
    info = read_adapter_info(path)
    shapes = adapter_shapes(path)
    return {"kind": "adapter", "format": info.source, "method": info.method,
            "base_model": info.base_model, "base_fingerprint": info.base_fingerprint,
            "objective": info.objective, "tokenizer": info.has_tokenizer,
            "chat_template": info.chat_template["name"] if info.chat_template else None,
            "system_prompt": info.system_prompt,
            "tensors": len(shapes), "parameters": sum(math.prod(shape) for shape in shapes.values()),
            "metadata": adapter_metadata(path), "example_tensors": dict(list(shapes.items())[:4])}


def _model(folder: Path) -> dict[str, Any]:
    cfg = _json(folder / "config.json", read_json_object, "copy or save the model again")
    out = {"kind": "model", "architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
           "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
           "vocab_size": cfg.get("vocab_size")}
    if (folder / MERGE_JSON).is_file():
        out["merged_from"] = _json(folder / MERGE_JSON, read_json_object, "merge the model again")
    if (folder / SOURCE_FILE).is_file():
        out["builtin"] = read_source(folder)
    return out


def _builtin(name: str) -> dict[str, Any]:
    """A built-in model by name: what it is, and whether it has been converted into the cache yet."""
    cache = default_cache_dir() / "models" / name
    out = {"kind": "builtin_model", **model_source(name), "install": BUILTINS[name].install,
           "converted": (cache / "config.json").is_file(), "cache": str(cache)}
    if out["converted"]:
        out["model"] = _model(cache)
    return out


def _run_kind(folder: Path) -> str | None:
    """Which command made the run folder (None: it is not one), from its folders or its config.yaml's keys."""
    config = _run_config(folder)
    if (folder / "values").is_dir() or "rewards" in config:
        return "vas_train_run"
    if (folder / "model" / HELPER_JSON).is_file() or "tokenizer_from" in config:
        return "make_helper_run"
    if (folder / "adapter" / CONFIG_NAME).is_file() or "method" in config or checkpoint_dirs(folder):
        return "train_run"
    return None


def _run_config(folder: Path) -> dict[str, Any]:
    return read_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}


def _run(folder: Path, kind: str) -> dict[str, Any]:
    """A run folder: what it produced, its checkpoints and its report (absent while the run is unfinished)."""
    report = folder / "report.json"
    out: dict[str, Any] = {"kind": kind, "made_by": RUN_KINDS[kind], "finished": report.is_file(),
                           "checkpoints": [int(p.name.split("-")[1]) for p in checkpoint_dirs(folder)]}
    if kind == "train_run":
        adapter = folder / "adapter"
        out["adapter"] = inspect_adapter(adapter) if (adapter / CONFIG_NAME).is_file() else None
    elif kind == "make_helper_run":
        model = folder / "model"
        out["model"] = inspect_path(model) if (model / HELPER_JSON).is_file() else None
    else:
        out["value_models"] = {p.parent.name: inspect_path(p.parent)
                               for p in sorted((folder / "values").glob(f"*/{VALUE_JSON}"))}
        samples = folder / "samples.jsonl"
        out["samples"] = sum(1 for line in samples.open(encoding="utf-8", errors="replace") if line.strip()) \
            if samples.is_file() else None
    if report.is_file():
        out["run_report"] = _json(report, read_json, "run it again")
    return out


def _json(path: Path, read: Callable[[Path], Any], todo: str) -> Any:
    try:
        return read(path)
    except JsonFileError as exc:
        raise LmadaptError(f"{exc}; fix it, or {todo}") from None
