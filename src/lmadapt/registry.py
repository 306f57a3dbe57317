"""Registries of named components (methods, objectives): register a class by name, then validate and build
the config section that names it (``method: {name: lora, r: 16}``, ``objective: {name: distill, ...}``).

A component class sets ``name`` and ``config_class`` (a dataclass whose fields are the section's keys).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

from lmadapt.config import ConfigError, brief, did_you_mean, from_dict, to_dict

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one kind of component, by name; ``section`` is the config key that selects one."""

    def __init__(self, section: str, default: str) -> None:
        self.section, self.default = section, default
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` available by its ``name``."""
        name = getattr(cls, "name", "")
        if not name or not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__name__} needs a name and a dataclass config_class")
        if name in self._classes and self._classes[name] is not cls:
            raise TypeError(f"a {self.section} named {name!r} is already registered")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's or a plugin's temporary component)."""
        self._classes.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def classes(self) -> list[type[T]]:
        """Registered classes, in the order of :meth:`names`."""
        return [self._classes[n] for n in self.names()]

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a ConfigError with "did you mean" for unknown names."""
        if not isinstance(name, str):
            got = "null" if name is None else f"{type(name).__name__} {brief(name)}"
            raise ConfigError([f"{self.section}.name: expected a {self.section} name (a string), got {got}. "
                               f"Available: {', '.join(self.names())}"])
        if name not in self._classes:
            raise ConfigError([f"{self.section}.name: unknown {self.section} {brief(name)}."
                               f"{did_you_mean(str(name), self._classes)} Available: {', '.join(self.names())}"])
        return self._classes[name]

    def normalise(self, spec: Any) -> Any:
        """A section given as a bare name (``method: lora``) as ``{"name": "lora"}``; anything else as given."""
        return {"name": spec} if isinstance(spec, str) else spec

    def problems(self, spec: dict[str, Any]) -> list[str]:
        """Every problem in the section, as '<section>.<key>: ...' strings (empty when valid)."""
        try:
            cls = self.get(spec.get("name", self.default))
        except ConfigError as exc:
            return exc.problems
        try:
            from_dict(cls.config_class, {k: v for k, v in spec.items() if k != "name"})
        except ConfigError as exc:
            return [f"{self.section}.{p}" for p in exc.problems]
        return []

    def build(self, spec: dict[str, Any] | T | None, **kwargs: Any) -> T:
        """An instance from ``{"name": ..., **fields}`` (validated; raises ConfigError); ``kwargs`` go to the
        class. An instance is returned as it is; None builds the default."""
        if spec is None:
            spec = {"name": self.default}
        if not isinstance(spec, dict):
            return spec
        cls = self.get(spec.get("name", self.default))
        try:
            cfg = from_dict(cls.config_class, {k: v for k, v in spec.items() if k != "name"})
        except ConfigError as exc:
            raise ConfigError([f"{self.section}.{p}" for p in exc.problems]) from None
        return cls(cfg, **kwargs)

    def spec(self, component: T) -> dict[str, Any]:
        """The config section that rebuilds ``component``."""
        return {"name": component.name, **to_dict(component.config)}  # type: ignore[attr-defined]


def config_with_sections(cls: type, data: dict[str, Any], where: str | None,
                         sections: dict[str, tuple[Registry[Any], dict[str, Any]]]) -> tuple[Any, list[str]]:
    """(``cls`` built from ``data`` or None, every problem): the config's own fields and each component section
    (``sections`` maps a key such as "method" to its registry and the section used when the key is absent),
    each checked by the selected component's rules. ``data`` is updated in place (bare names become
    ``{"name": ...}``). Callers add their own cross-field checks before raising one ConfigError."""
    for key, (registry, _) in sections.items():
        if key in data:
            data[key] = registry.normalise(data[key])
    problems: list[str] = []
    cfg = None
    try:
        cfg = from_dict(cls, data, where)
    except ConfigError as exc:
        problems += exc.problems
    for key, (registry, default) in sections.items():
        spec = data.get(key, default)
        if isinstance(spec, dict):
            problems += registry.problems(spec)
    return cfg, problems
