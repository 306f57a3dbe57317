"""The method registry: methods register by name; ``method:`` sections are validated and built here."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmadapt.config import ConfigError, did_you_mean, from_dict, to_dict
from lmadapt.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name or not dataclasses.is_dataclass(cls.config_class):
        raise TypeError(f"{cls.__name__} needs a name and a dataclass config_class")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class for ``name``, with a helpful error for unknown names."""
    if name not in _REGISTRY:
        raise ConfigError([f"method.name: unknown method {name!r}.{did_you_mean(name, _REGISTRY)} "
                           f"Available: {', '.join(available_methods())}"])
    return _REGISTRY[name]


def method_for_peft_type(peft_type: str) -> type[Method] | None:
    """The registered method that reads PEFT adapters of ``peft_type`` (e.g. "LORA"), if any."""
    for cls in _REGISTRY.values():
        if cls.peft_type == peft_type:
            return cls
    return None


def method_problems(spec: dict[str, Any]) -> list[str]:
    """Every problem in a ``method:`` section, as 'method.<key>: ...' strings (empty when valid)."""
    name = spec.get("name", "lora")
    try:
        cls = method_class(name)
    except ConfigError as exc:
        return exc.problems
    fields = {k: v for k, v in spec.items() if k != "name"}
    try:
        from_dict(cls.config_class, fields)
    except ConfigError as exc:
        return [f"method.{p}" for p in exc.problems]
    return []


def config_with_method(cls: type, data: dict[str, Any], where: str | None,
                       default_method: dict[str, Any]) -> tuple[Any, list[str]]:
    """(``cls`` built from ``data`` or None, every problem): the config's own fields and its ``method:`` section
    (checked by that method's rules; a string is a method name; ``default_method`` when absent). ``data`` is
    updated in place. Callers add their own cross-field checks before raising one ConfigError."""
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    problems: list[str] = []
    cfg = None
    try:
        cfg = from_dict(cls, data, where)
    except ConfigError as exc:
        problems += exc.problems
    method = data.get("method", default_method)
    if isinstance(method, dict):
        problems += method_problems(method)
    return cfg, problems


def build_method(spec: dict[str, Any] | Method) -> Method:
    """A method instance from ``{"name": ..., **fields}`` (validated; raises ConfigError)."""
    if isinstance(spec, Method):
        return spec
    name = spec.get("name", "lora")
    cls = method_class(name)
    fields = {k: v for k, v in spec.items() if k != "name"}
    try:
        cfg = from_dict(cls.config_class, fields)
    except ConfigError as exc:
        raise ConfigError([f"method.{p}" for p in exc.problems]) from None
    return cls(cfg)


def method_spec(method: Method) -> dict[str, Any]:
    """The ``method:`` section that rebuilds ``method``."""
    return {"name": method.name, **to_dict(method.config)}
