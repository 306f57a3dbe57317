"""Reading a JSON file that a person or another program wrote, with errors that say where it is broken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmadapt.errors import LmadaptError


class JsonFileError(LmadaptError):
    """A JSON file that could not be read; ``problem`` says why (UTF-8, syntax with line and column, depth,
    or the wrong kind of value), and the message is ``"<path>: <problem>"``."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def read_json(path: str | Path) -> Any:
    """The value in the JSON file ``path``; :class:`JsonFileError` if it cannot be read, is not UTF-8 or not JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JsonFileError(path, f"not readable ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = len(raw[raw.rfind(b"\n", 0, exc.start) + 1:exc.start].decode("utf-8", "replace")) + 1  # characters
        raise JsonFileError(path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at line {line}, "
                                  f"column {column})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileError(path, f"not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    except RecursionError:
        raise JsonFileError(path, "not readable: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4,300-digit limit
        raise JsonFileError(path, f"not readable: {exc}") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object (``{...}``) in ``path``; :class:`JsonFileError` for anything else (see :func:`read_json`)."""
    value = read_json(path)
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise JsonFileError(Path(path), f"expected a JSON object {{...}}, got {kind}")
    return value
