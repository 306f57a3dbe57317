"""Reading a YAML file that a person wrote, with errors that say where it is broken.

``yaml.safe_load`` lets several inputs escape as Python errors: a file that is not UTF-8
(UnicodeDecodeError), deep nesting (RecursionError), an integer over Python's 4,300-digit limit or an
impossible date such as ``2024-13-45`` (ValueError), and a control character (a ReaderError with an offset,
not a line). Here each is an error naming the file, line and column. Valid dates stay the text they were
written as: no config field is a date.
"""

from __future__ import annotations

import reprlib
import sys
from pathlib import Path
from typing import Any

import yaml

from lmadapt.errors import ConfigError

MAX_DEPTH = 100
"""Deepest nesting a config may have (sections are 2-3 deep); deeper input is refused before Python's
recursion limit is reached."""
MAX_VALUES = 1_000_000
"""Most values a config may expand to through YAML aliases (``*a``); a larger one is an alias bomb."""


class YamlValueError(yaml.MarkedYAMLError):
    """YAML that parses but that a config cannot hold: nested deeper than :data:`MAX_DEPTH`, more than
    :data:`MAX_VALUES` values through aliases, an integer over Python's digit limit, an impossible date."""


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with limits: what :class:`YamlValueError` lists is an error with a line, not a
    RecursionError or ValueError; a valid date stays the text it was written as (no config field is a date)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth, self.sizes = 0, {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YamlValueError(problem=f"nested too deeply (more than {MAX_DEPTH} levels)",
                                     problem_mark=self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self._count(node)
        return node

    def _count(self, node: Any) -> None:
        """Values under ``node`` with aliases expanded (children are counted before their parent)."""
        if id(node) in self.sizes:  # an alias: the anchored node, already counted
            return
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        self.sizes[id(node)] = size = 1 + sum(self.sizes.get(id(c), 1) for c in children)
        if size > MAX_VALUES:
            raise YamlValueError(problem=f"aliases expand this value to {size:,} values (at most "
                                         f"{MAX_VALUES:,}); write the value out", problem_mark=node.start_mark)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, LookupError, TypeError, AttributeError) as exc:  # e.g. int("7" * 5000)
            raise YamlValueError(problem=_value_problem(node, exc), problem_mark=node.start_mark) from None

    def construct_date_as_text(self, node: Any) -> str:
        """A date or time as the text it was written as; ValueError when it is not a possible one."""
        text = self.construct_scalar(node)
        if not self.timestamp_regexp.match(text):
            raise ValueError("not a date")
        self.construct_yaml_timestamp(node)  # ValueError for month 13, day 45, hour 25
        return text


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_date_as_text)


def _value_problem(node: Any, exc: Exception) -> str:
    """What is wrong with a value YAML parsed but could not build (``exc`` from its constructor)."""
    text = node.value if isinstance(node, yaml.ScalarNode) else ""
    kind = str(node.tag).rsplit(":", 1)[-1]
    digits, limit = sum(c.isdigit() for c in text), sys.get_int_max_str_digits()
    if kind == "int" and 0 < limit < digits:
        return f"number too long ({digits:,} digits; at most {limit:,})"
    if kind == "timestamp":
        return f"{reprlib.repr(text)} is not a valid date ({exc}); quote it to use it as text"
    return f"{reprlib.repr(text)} cannot be read as {kind} ({exc})"


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load(text)`` with the limits of :class:`YamlValueError`, which it raises for them; syntax
    errors are ``yaml.YAMLError`` as usual."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # should not happen below MAX_DEPTH; kept so it can never escape as a traceback
        raise YamlValueError(problem="nested too deeply") from None


def _where(text: str, offset: int) -> str:
    """' line N, column M' of character ``offset`` in ``text``."""
    line, line_start = text.count("\n", 0, offset) + 1, text.rfind("\n", 0, offset) + 1
    return f" line {line}, column {offset - line_start + 1}"


def _decode_yaml(path: Path) -> str:
    """The file as text: strict UTF-8 (a leading byte-order mark is dropped), else a ConfigError naming the byte."""
    if path.is_dir():
        raise ConfigError([f"{path} is a directory; give the YAML config file in it"])
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as exc:
        raise ConfigError([f"config file {path} cannot be read ({exc.strerror or exc})"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = " (it looks like UTF-16)" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise ConfigError([f"{path} line {line}, column {column}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})"
                           f"{utf16}; save it as UTF-8"]) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; every error names the file, and the line and column where YAML has one."""
    path = Path(path)
    text = _decode_yaml(path)
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1}, column {mark.column + 1}"
        elif isinstance(exc, yaml.reader.ReaderError):  # a control character: only an offset is known
            where = _where(text, exc.position)
        else:
            where = ""
        if isinstance(exc, YamlValueError):
            what = exc.problem
        elif isinstance(exc, yaml.reader.ReaderError):
            what = f"not valid YAML (the character U+{exc.character:04X} is not allowed in YAML; remove it)"
        else:
            what = f"not valid YAML ({getattr(exc, 'problem', None) or exc})"
        raise ConfigError([f"{path}{where}: {what}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys to values"])
    return data
