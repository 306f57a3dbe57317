"""Typed configuration: dataclasses read from YAML, checked field by field, every problem reported at once.

Each section is a dataclass declared next to the code that uses it; each field is declared with
:func:`option`, which carries the help text shown by ``lmadapt config-help``. This module
only knows how to turn nested dicts (YAML, ``key=value`` overrides) into those dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lmadapt.errors import ConfigError
from lmadapt.yamlfile import YamlValueError, load_yaml_text, read_yaml

__all__ = ["ConfigError", "Replace", "brief", "config_source", "deep_merge", "describe", "did_you_mean",
           "from_dict", "option", "parse_overrides", "read_yaml", "to_dict"]

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

_MISSING = dataclasses.MISSING

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def brief(value: Any, limit: int = 200) -> str:
    """``repr(value)`` shortened for a message: long strings and big lists are cut (at most ``limit`` chars)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING) -> Any:
    """Declare a config field with its help text (shown in docs and by ``lmadapt config-help``)."""
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """A ' Did you mean X?' suffix when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check (and gently coerce) one value against a type; append a problem and return None on failure."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built, e.g. passed from Python
            return value
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a section (mapping), got {type(value).__name__} {brief(value)}")
            return None
        return _build(tp, value, key, problems)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = did_you_mean(str(value), [str(a) for a in allowed])
        problems.append(f"{key}: {brief(value)} is not one of {', '.join(repr(a) for a in allowed)}.{hint}")
        return None
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # first member that accepts the value without complaint wins
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {brief(value)}")
        return None
    if origin is list:
        (item_tp,) = get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {brief(value)}")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {brief(value)}")
    return None


def _build(cls: type[T], data: dict[str, Any], prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(f"{path}: unknown key.{did_you_mean(str(key), fields)}"
                            f" Known keys here: {', '.join(sorted(fields))}")
            continue
        before = len(problems)
        converted = _convert(value, hints[key], path, problems)
        if len(problems) == before:
            kwargs[key] = converted
    for name, f in fields.items():
        if name not in data and f.default is _MISSING and f.default_factory is _MISSING:
            path = f"{prefix}.{name}" if prefix else name
            problems.append(f"{path}: required, not given. {f.metadata.get('help', '')}".rstrip())
    if len(kwargs) < len([k for k in data if k in fields]):
        return None  # type: ignore[return-value]  # problems already recorded
    try:
        obj = cls(**kwargs)
    except TypeError:  # a required field was missing: already reported above
        return None  # type: ignore[return-value]
    check = getattr(obj, "check", None)
    if callable(check):
        for problem in check():
            problems.append(f"{prefix}.{problem}" if prefix else problem)
    return obj


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict; raise :class:`ConfigError` listing every problem.

    A section may define ``check(self) -> list[str]`` for cross-field rules; each string starts with
    the field name (``"lr: must be > 0"``) so the message names the key as the user typed it.
    """
    problems: list[str] = []
    obj = _build(cls, data or {}, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Replace(dict):
    """A section given whole (``method={name: full}``): :func:`deep_merge` puts it in place of the section it
    meets instead of merging into it."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "method.r=8"]`` into a nested dict; values are parsed as YAML.

    A dotted key changes one field and keeps the rest of its section; a mapping given as the value
    (``method={name: full, r: 4}``) is the whole section, a :class:`Replace` that takes the place of the
    config file's (so ``method={name: full}`` switches methods without the file's LoRA fields). Later
    overrides apply on top of earlier ones. A value that is not valid YAML is taken as text; one YAML reads
    but cannot hold (nested too deeply, an integer over Python's digit limit, an impossible date) is a
    problem naming the override.
    """
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        if "=" not in pair:
            problems.append(f"override {brief(pair)}: expected key=value, e.g. train.lr=1e-4")
            continue
        key, raw = pair.split("=", 1)
        try:
            value = load_yaml_text(raw) if raw != "" else ""
        except YamlValueError as exc:
            problems.append(f"override {brief(pair)}: {exc.problem}")
            continue
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 reads 1e-4 as a string
            value = float(value)
        elif isinstance(value, dict):
            value = Replace(value)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {brief(pair)}: {part} is both a value and a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``extra``, recursing into sections; a :class:`Replace` section of ``extra``
    takes the place of ``base``'s. The result holds plain dicts only."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict):
            keep = out.get(key) if isinstance(out.get(key), dict) and not isinstance(value, Replace) else {}
            out[key] = deep_merge(keep, value)
        else:
            out[key] = value
    return out


def config_source(source: Any, overrides: typing.Sequence[str] | dict[str, Any] = ()) -> tuple[dict[str, Any], str | None]:
    """(data, file name or None) for a config given as a YAML path, a dict or a config dataclass, with
    ``key=value`` overrides (or a dict of them) merged in: what every ``load_*_config`` starts from."""
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        data, where = to_dict(source), None
    elif isinstance(source, dict):
        data, where = dict(source), None
    else:
        data, where = read_yaml(source), str(source)
    extra = dict(overrides) if isinstance(overrides, dict) else parse_overrides(list(overrides))
    return deep_merge(data, extra), where


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every field of a config dataclass, recursing into sections."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
            continue
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):
            rows.append((key, _type_name(tp), "[]", f.metadata.get("help", "") + " Each item has:"))
            rows += describe(item, key + "[].")
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
