"""Several LoRA adapters on one model: list them, choose the active ones, route batch rows, delete one.

Load each with ``load_adapter(model, path, name=...)`` (:mod:`lmadapt.adapters.format`). The first adapter
loaded is active; a further one is not until chosen::

    load_adapter(model, "adapters/sql")                       # name "default", active
    load_adapter(model, "adapters/chat", name="chat")         # frozen, inactive
    with active_adapters(model, ["chat"]):
        ...                                                   # every row through "chat"
    with adapter_per_row(model, ["default", "chat", None]):
        model(input_ids=ids)                                  # row 0: default, row 1: chat, row 2: base model

Row r of a routed batch computes ``W x + b + s_n B_n A_n x`` with n its adapter, which is what the model
gives that row with only n active (``tests/test_named_adapters.py`` checks this against separate
forwards). Switching off adapters by name: :func:`lmadapt.models.tree.adapters_disabled`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from lmadapt.errors import AdapterError
from lmadapt.methods.lora_layer import DEFAULT_ADAPTER, LoraLinear, RowRouting
from lmadapt.models.tree import modules_of_type, replace_module

__all__ = [
    "DEFAULT_ADAPTER", "active_adapter_names", "active_adapters", "adapter_names", "adapter_parameter_names",
    "adapter_per_row", "delete_adapter", "set_active_adapters",
]


def _layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    layers = list(modules_of_type(model, LoraLinear))
    if not layers:
        raise AdapterError("the model holds no LoRA adapter; load one with lmadapt.load_adapter(model, path)")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """The named LoRA adapters the model holds, in the order their layers list them (empty for a plain model)."""
    names: dict[str, None] = {}
    for _, layer in modules_of_type(model, LoraLinear):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def _check_names(model: nn.Module, names: Sequence[str | None], what: str) -> None:
    held = adapter_names(model)
    unknown = sorted({n for n in names if n is not None and n not in held})
    if unknown:
        raise AdapterError(f"{what}: the model holds no adapter named {', '.join(map(repr, unknown))}; it holds "
                           f"{held or 'none'}. Load one with load_adapter(model, path, name=...)")


def _name_list(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def active_adapter_names(model: nn.Module) -> list[str]:
    """The adapters every row goes through (when no per-row routing is set)."""
    return list(_layers(model)[0][1].active_adapters)


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their updates add up; an empty list gives the base model)."""
    names = _name_list(names)
    _check_names(model, names, "set_active_adapters")
    for _, layer in _layers(model):
        layer.active_adapters = tuple(names)


@contextlib.contextmanager
def active_adapters(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Module]:
    """Inside, ``names`` are the active adapters; the previous ones come back on exit."""
    before = [(layer, layer.active_adapters) for _, layer in _layers(model)]
    set_active_adapters(model, names)
    try:
        yield model
    finally:
        for layer, active in before:
            layer.active_adapters = active


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside, batch row r goes through adapter ``names[r]`` only (None: the base model), whatever is active.

    Every call inside must have ``len(names)`` rows (so no beam search, no ``num_return_sequences > 1``);
    ``adapters_disabled`` still switches rows off. Merged adapters are taken back out of the rows that
    do not use them, so the result does not depend on what is merged.
    """
    names = list(names)
    if not names:
        raise AdapterError("adapter_per_row: give one adapter name (or None for the base model) per batch row")
    _check_names(model, names, "adapter_per_row")
    routing = RowRouting(names)
    before = [(layer, layer.routing) for _, layer in _layers(model)]
    for layer, _ in before:
        layer.routing = routing
    try:
        yield model
    finally:
        for layer, previous in before:
            layer.routing = previous


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: unmerged first when merged, dropped from the active set; a layer left with
    no adapter becomes a plain ``nn.Linear`` again."""
    _check_names(model, [name], "delete_adapter")
    for module_name, layer in _layers(model):
        if name not in layer.adapter_names:
            layer.active_adapters = tuple(n for n in layer.active_adapters if n != name)
            continue
        layer.unmerge_adapter(name)
        if layer.adapter_names == (name,):
            replace_module(model, module_name, layer.as_linear())
        else:
            layer.remove_adapter(name)
            layer.active_adapters = tuple(n for n in layer.active_adapters if n != name)


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Full names of every LoRA factor in the model (what a base-model fingerprint must leave out)."""
    return {f"{layer_name}.{param_name}" for layer_name, layer in modules_of_type(model, LoraLinear)
            for param_name, _ in layer.named_parameters() if param_name not in ("weight", "bias")}
