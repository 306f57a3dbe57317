"""The method registry: methods register by name; ``method:`` sections are validated and built here."""

from __future__ import annotations

from typing import Any

from lmadapt.methods.base import Method
from lmadapt.registry import Registry, config_with_sections

METHODS: Registry[Method] = Registry("method", default="lora")

register = METHODS.register
available_methods = METHODS.names
method_class = METHODS.get
method_problems = METHODS.problems
method_spec = METHODS.spec


def build_method(spec: dict[str, Any] | Method) -> Method:
    """A method instance from ``{"name": ..., **fields}`` (validated; raises ConfigError)."""
    return METHODS.build(spec)


def method_for_peft(peft_config: dict[str, Any]) -> type[Method] | None:
    """The registered method that reads the PEFT adapter whose ``adapter_config.json`` is ``peft_config``, if
    any: the one whose :meth:`Method.claims_peft` accepts it (e.g. a "LORA" config with ``use_dora`` is DoRA's)."""
    for cls in METHODS.classes():
        if cls.peft_type is not None and cls.claims_peft(peft_config):
            return cls
    return None


def config_with_method(cls: type, data: dict[str, Any], where: str | None,
                       default_method: dict[str, Any]) -> tuple[Any, list[str]]:
    """(``cls`` built from ``data`` or None, every problem): the config's own fields and its ``method:`` section
    (checked by that method's rules; a string is a method name; ``default_method`` when absent)."""
    return config_with_sections(cls, data, where, {"method": (METHODS, default_method)})
