"""The adapter format: ``adapter_model.safetensors`` + ``adapter_config.json`` in one folder.

For methods PEFT also has (LoRA), both files follow PEFT's layout, so ``PeftModel.from_pretrained``
loads an lmadapt adapter and lmadapt loads a PEFT one. lmadapt adds, without disturbing PEFT, a
*record*: the method name and full config, the base model's name and fingerprint, and the lmadapt
version. It is stored as JSON under the key ``lmadapt`` of the
safetensors header metadata (which PEFT ignores), and, for methods PEFT does not have, also as
``adapter_config.json["lmadapt"]`` (PEFT warns about unknown keys in its config, so LoRA's JSON
stays PEFT's own).

No pickles are read or written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lmadapt.adapters.pool import (
    DEFAULT_ADAPTER,
    adapter_parameter_names,
    delete_adapter,
)
from lmadapt.errors import AdapterError
from lmadapt.fsutil import atomic_dir
from lmadapt.methods import Method, build_method, method_for_peft_type, method_spec

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
RECORD_KEY = "lmadapt"


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself."""

    path: Path
    method: dict[str, Any]  # the method: section that rebuilds it
    base_model: str | None
    base_fingerprint: str | None
    source: str  # "lmadapt" or "peft"
    config: dict[str, Any]  # the raw adapter_config.json


def save_adapter(model: nn.Module, method: Method, path: str | Path, *, base_model: str | None,
                 base_fingerprint: str | None, overwrite: bool = False,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter atomically into folder ``path`` (refusing an existing one unless ``overwrite``)."""
    from lmadapt import __version__

    state = {k: v.detach().to("cpu").contiguous() for k, v in method.adapter_state(model).items()}
    own = {"method": method_spec(method), "base_model": base_model,
           "base_fingerprint": base_fingerprint, "version": __version__, **(extra or {})}
    config = {**method.adapter_config(), "base_model_name_or_path": base_model}
    if method.peft_type is None:
        config["lmadapt"] = own
    meta = {"format": "pt", RECORD_KEY: json.dumps(own)}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """Parse ``adapter_config.json`` (lmadapt's or PEFT's) without loading the tensors."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        hint = " (PEFT's legacy adapter_model.bin pickles are not read: re-save it as safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_file}: not valid JSON ({exc})") from None
    own = config.get(RECORD_KEY) or _header_record(weights)
    if own:
        return AdapterInfo(path, own["method"], own.get("base_model"), own.get("base_fingerprint"),
                           "lmadapt", config)
    peft_type = config.get("peft_type")
    cls = method_for_peft_type(peft_type) if peft_type else None
    if cls is None:
        raise AdapterError(f"{cfg_file}: PEFT adapter type {peft_type!r} is not supported by lmadapt")
    try:
        spec = {"name": cls.name, **cls.config_from_peft(config)}
    except (ValueError, KeyError) as exc:
        raise AdapterError(f"{cfg_file}: {exc}") from None
    return AdapterInfo(path, spec, config.get("base_model_name_or_path"), None, "peft", config)


def _header_record(weights: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(weights), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(RECORD_KEY)
    except Exception:  # unreadable: loading the tensors will report it with the file's name
        return None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterError(f"{weights}: the '{RECORD_KEY}' header entry is not valid JSON") from None


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Replace the lmadapt record of an adapter folder (header, and the JSON copy when there is one)."""
    path = Path(path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    meta = adapter_metadata(path)
    meta[RECORD_KEY] = json.dumps(record)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata=meta)
    config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    if RECORD_KEY in config:
        config[RECORD_KEY] = record
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors; PEFT's per-adapter-name keys (``.lora_A.default.weight``) normalised."""
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    return {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata."""
    with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as fh:
        return dict(fh.metadata() or {})


def check_base(info: AdapterInfo, model: nn.Module, base_fingerprint: str | None = None) -> None:
    """Raise unless ``model`` (fingerprint ``base_fingerprint``, computed when None) is the base the
    adapter was trained on. Adapters that recorded no fingerprint (PEFT's own) pass."""
    from lmadapt.models.fingerprint import fingerprint

    if not info.base_fingerprint:
        return
    actual = base_fingerprint or fingerprint(model)
    if actual != info.base_fingerprint:
        name = getattr(model, "name_or_path", "")  # transformers models know where they were loaded from
        raise AdapterError(
            f"adapter {info.path} was trained on base model {info.base_model!r} (fingerprint "
            f"{info.base_fingerprint}), but the model it is being applied to"
            f"{f' ({name!r})' if name else ''} has fingerprint {actual}. "
            f"Load the right base model, or pass --force (force=True) to apply it anyway.")


def load_adapter(model: nn.Module, path: str | Path, *, name: str = DEFAULT_ADAPTER, trainable: bool | None = None,
                 base_fingerprint: str | None = None, force: bool = False) -> Method:
    """Apply the adapter in ``path`` to ``model`` in place and return its method.

    ``base_fingerprint`` is the fingerprint of ``model``'s base weights (computed here when None, leaving
    out the factors of LoRA adapters already loaded); an adapter trained on other weights is refused
    unless ``force``.

    ``name`` loads a LoRA adapter as a further named adapter of a model that holds others (see
    :mod:`lmadapt.adapters.pool`): it does not become active, and it is frozen unless ``trainable``
    (None: only the adapter named "default" trains). When its tensors do not fit, it is removed again.
    """
    from lmadapt.models.fingerprint import fingerprint

    info = read_adapter_info(path)
    if not force:
        if info.base_fingerprint and base_fingerprint is None:
            base_fingerprint = fingerprint(model, exclude=adapter_parameter_names(model).__contains__)
        check_base(info, model, base_fingerprint)
    try:
        method = build_method(info.method)
    except Exception as exc:
        raise AdapterError(f"{info.path / CONFIG_NAME}: {exc}") from None
    named = hasattr(method, "adapter_name")  # methods that can share a model with others (LoRA)
    if not named and (name != DEFAULT_ADAPTER or trainable is not None):
        raise AdapterError(f"{info.path}: a {method.name!r} adapter cannot be loaded under a name or as "
                           f"frozen: only LoRA adapters can share a model; load it on its own")
    if named:
        method.adapter_name, method.trainable = name, trainable
    method.apply(model)
    try:
        load_adapter_weights(model, method, info)
    except AdapterError:
        if named:
            delete_adapter(model, name)
        raise
    return method


def load_adapter_weights(model: nn.Module, method: Method, info: AdapterInfo) -> None:
    """Copy the adapter's tensors into ``model``, to which ``method`` has been applied."""
    if info.method.get("name") != method.name:
        raise AdapterError(f"{info.path}: holds a {info.method.get('name')!r} adapter, not {method.name!r}")
    try:
        method.load_adapter_state(model, read_adapter_tensors(info.path))
    except (KeyError, ValueError) as exc:
        raise AdapterError(f"{info.path / WEIGHTS_NAME}: {exc}") from None
