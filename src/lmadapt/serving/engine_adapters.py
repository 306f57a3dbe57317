"""Which adapters the serving engine can hold, and how each is put on (or taken off) the model.

Two ways to serve an adapter, chosen by its method:

- **Routed** (plain LoRA: methods with ``named_adapters``, lmadapt's ``lora`` and PEFT LoRA folders): loaded as a
  named adapter of the one base model (:func:`lmadapt.adapters.format.load_adapter` with ``name=``); in a batch
  each row goes through its own adapter or none (:func:`lmadapt.adapters.pool.adapter_per_row`), so rows of
  any LoRA adapters and of the base decode in one forward. Costs the adapter's factors only.
- **Own group** (every other method whose adapter leaves the tokenizer alone: DoRA, PiSSA/OLoRA/CorDA, IA3,
  bottleneck, full/freeze, ...): these change the model itself (their own layers, rewritten base weights), so
  the adapter goes on a private copy of the base model and its rows decode together in a forward of their own
  each step. Costs a full copy of the base weights, and one more forward per step while it has rows.

Refused, with the reason: methods that change the tokenizer (``new_tokens``: one engine decodes with one
tokenizer) and methods that put extra positions in the KV cache (prompt tuning: its soft prompt sits at the front
of each row's cache, where the batch's left padding goes), found by a probe forward after loading.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmadapt.adapters.format import (
    AdapterInfo,
    load_adapter,
    load_adapter_contents,
    read_adapter_info,
)
from lmadapt.adapters.pool import adapter_names, delete_adapter
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.methods import method_class
from lmadapt.models.tree import model_device
from lmadapt.serving.batch_cache import prefill


@dataclass
class ServedAdapter:
    """One adapter the engine serves."""

    name: str
    path: str | None  # its folder; None for a LoRA adapter the model held when the engine was made
    method: str
    base: str | None  # the base model its record names
    routed: bool  # True: a named LoRA adapter of the base model, routed per row; False: its own model copy
    model: nn.Module  # the model its rows run through (the base model itself when routed)
    chat_template: str | None = None  # the template its training conversations used (None: the tokenizer's)
    system_prompt: str | None = None  # the system turn its training put before prompts

    def describe(self) -> dict[str, Any]:
        """What :meth:`Engine.adapters` lists: path, method, base, routed, chat_template, system_prompt."""
        return {"path": self.path, "method": self.method, "base": self.base, "routed": self.routed,
                "chat_template": self.chat_template, "system_prompt": self.system_prompt}


def held_adapters(model: nn.Module) -> dict[str, ServedAdapter]:
    """The LoRA adapters ``model`` already holds (loaded before the engine was made), served by their names."""
    return {name: ServedAdapter(name, None, "lora", None, True, model) for name in adapter_names(model)}


def check_servable(name: str, path: str | Path) -> AdapterInfo:
    """The adapter folder's info, or an AdapterError when the engine cannot serve it (read only: the model is not
    touched, so this runs outside the decoding loop)."""
    if not isinstance(name, str) or not name.strip():
        raise AdapterError(f"an adapter needs a non-empty name, got {name!r}")
    info = read_adapter_info(path)
    try:
        cls = method_class(info.method["name"])
    except LmadaptError as exc:
        raise AdapterError(f"{info.path}: {exc}") from None
    if cls.changes_tokenizer:
        raise AdapterError(f"{info.path}: a {cls.name!r} adapter changes the tokenizer, and the engine decodes every "
                           f"request with the base model's; serve it from a process of its own (lmadapt serve "
                           f"--adapter with only it), or merge it (lmadapt merge) and serve the merged model")
    return info


def load_served(model: nn.Module, tokenizer: Any, name: str, info: AdapterInfo, *, base_fingerprint: str | None,
                force: bool) -> ServedAdapter:
    """Put the adapter ``info`` describes on ``model`` (routed) or on a copy of it (own group); call between
    decode steps. A failure leaves ``model`` as it was."""
    cls = method_class(info.method["name"])
    record = {"chat_template": (info.chat_template or {}).get("template"), "system_prompt": info.system_prompt}
    if cls.named_adapters:
        load_adapter(model, info.path, name=name, base_fingerprint=base_fingerprint, force=force)
        return ServedAdapter(name, str(info.path), cls.name, info.base_model, True, model, **record)
    own = base_copy(model)
    load_adapter_contents(own, info.path, tokenizer=tokenizer, base_fingerprint=base_fingerprint, force=force)
    own.eval()
    try:
        probe(own)
    except Exception as exc:  # noqa: BLE001 - a model that cannot decode with a batch cache: refused, not a crash
        raise AdapterError(f"the serving engine cannot batch the {cls.name!r} adapter {info.path}: {exc}") from None
    return ServedAdapter(name, str(info.path), cls.name, info.base_model, False, own, **record)


def unload_served(served: ServedAdapter) -> None:
    """Take a routed adapter off the base model (an own-group copy is simply dropped); between decode steps."""
    if served.routed:
        delete_adapter(served.model, served.name)


def base_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its LoRA adapters: the plain base an own-group adapter is applied to."""
    own = copy.deepcopy(model)
    for name in adapter_names(own):
        delete_adapter(own, name)
    return own


def probe(model: nn.Module) -> None:
    """Two tokens through ``model`` with a KV cache: a ModelError unless its cache is one the batch can edit
    (supported layers, one position per token)."""
    with torch.inference_mode():
        prefill(model, [[0, 0]], 0, model_device(model))
