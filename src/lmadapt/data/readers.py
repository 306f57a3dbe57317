"""Reading data files into :class:`Record` rows, with a problem string for every row that cannot be read.

Supported: JSONL (one object per line), JSON (an array of objects, or an object holding one array), CSV
(header row, then one row per record), Parquet, and plain text (``.txt``/``.md``: the whole file is one
document). Bytes are decoded strictly line by line, so one bad line does not spoil the file.

Every record and problem names where it came from: ``path:LINE`` (JSONL, CSV: the physical line where
the row starts), ``path:item N`` (JSON array, 1-based), ``path:row N`` (Parquet, 1-based), ``path`` (text).
"""

from __future__ import annotations

import csv
import glob
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmadapt.errors import ConfigError

BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    """One row as read from a file; ``source`` says where (see the module docstring)."""

    source: str
    data: dict[str, Any]


@dataclass
class ReadResult:
    """What reading some files gave: the rows, problems with single rows, problems with whole files."""

    records: list[Record] = field(default_factory=list)
    row_problems: list[str] = field(default_factory=list)
    file_problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # files that hold no rows at all

    @property
    def rows_read(self) -> int:
        """Rows seen, good or bad."""
        return len(self.records) + len(self.row_problems)


def type_name(value: Any) -> str:
    """A JSON-ish name of a value's type for messages: str, int, float, bool, list, object, null."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def unpaired_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in ``text`` as 'U+D800', else None. A JSON escape ("\\ud800") or a
    command-line argument that was not UTF-8 gives one; Python holds it, but no tokenizer can encode it."""
    match = _SURROGATE.search(text)
    return f"U+{ord(match.group()):04X}" if match else None


def expand_patterns(patterns: str | list[str]) -> list[Path]:
    """Paths matched by file names, directories or globs (their files of supported types), in order, once each.

    Raises :class:`ConfigError` naming every pattern that matches no such file and every named file of
    an unsupported type.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths: list[Path] = []
    problems = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file())
            if not any(p.suffix.lower() in READERS for p in found):
                problems.append(_no_data_files(path, found))
                continue
        elif path.is_file() and path.suffix.lower() not in READERS:
            problems.append(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
            continue
        else:
            found = [path] if path.is_file() else []
        supported = [p for p in found if p.suffix.lower() in READERS]
        if not supported:
            types = f" of a supported type ({', '.join(READERS)})" if found else ""
            problems.append(f"no file{types} matches {pattern!r}")
        paths += [p for p in supported if p not in paths]
    if problems:
        raise ConfigError(problems)
    return paths


def _no_data_files(folder: Path, files: list[Path]) -> str:
    """Why a directory given as data gives no files, and what to give instead."""
    problem = f"{folder} is a directory with no {'/'.join(READERS)} files directly in it"
    nested = next((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READERS), None)
    if nested is not None:
        return problem + (f"; subfolders are not read (e.g. {nested}): name them, or use a glob such as "
                          f"'{folder}/**/*{nested.suffix}'")
    if files:
        return problem + f" (it holds {len(files)} file(s) of other types, e.g. {files[0].name})"
    return problem + " (it is empty)"


def read_files(patterns: str | list[str], text_field: str = "text") -> ReadResult:
    """Read every file matched by ``patterns``; plain-text documents go under the key ``text_field``.

    A file that gives neither a row nor a problem (empty, blank lines, a CSV header only) is listed in
    ``empty``.
    """
    result = ReadResult()
    for path in expand_patterns(patterns):
        seen = result.rows_read + len(result.file_problems)
        result.files.append(str(path))
        READERS[path.suffix.lower()](path, result, text_field)
        if result.rows_read + len(result.file_problems) == seen:
            result.empty.append(str(path))
    return result


def read_records(patterns: str | list[str], text_field: str = "text") -> tuple[list[Record], list[str]]:
    """All rows of the files matched by ``patterns``, and a problem string for every unreadable row or file.

    A pattern matching nothing raises :class:`ConfigError` naming the pattern.
    """
    result = read_files(patterns, text_field)
    return result.records, result.file_problems + result.row_problems


def _decode(raw: bytes, where: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, problem) for one line of bytes."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"{where}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"


def _decode_file(path: Path, raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, problem naming the first bad line) for a whole file."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - line_start + 1
        return None, f"{path}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})"


def parse_json(text: str) -> tuple[Any, int, str | None]:
    """(value, 0, None), or (None, offset, problem) saying what is wrong at character ``offset`` of ``text``:
    a syntax error (with its column), nesting too deep for Python's parser, or an integer longer than
    Python's digit limit (``sys.get_int_max_str_digits()``)."""
    try:
        return json.loads(text), 0, None
    except json.JSONDecodeError as exc:
        return None, exc.pos, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        deepest, depth, _, _ = _scan_json(text)
        return None, deepest, f"nested too deeply ({depth:,} levels)"
    except ValueError as exc:  # int("7" * 5000) refuses; floats have no such limit
        _, _, longest, digits = _scan_json(text)
        limit = sys.get_int_max_str_digits()
        if 0 < limit < digits:
            return None, longest, f"number too long ({digits:,} digits; at most {limit:,})"
        return None, 0, f"not readable as JSON ({exc})"


def _scan_json(text: str) -> tuple[int, int, int, int]:
    """Outside strings: (offset, depth) of the deepest nesting and (offset, length) of the longest run of
    digits; only used to say where a document Python's parser refused goes wrong."""
    depth = deepest = deepest_at = run = longest = longest_at = 0
    in_string = escaped = False
    for i, char in enumerate(text):
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
            continue
        run = run + 1 if "0" <= char <= "9" else 0
        if run > longest:
            longest, longest_at = run, i - run + 1
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_at = depth, i
        elif char in "]}":
            depth -= 1
        in_string = char == '"'
    return deepest_at, deepest, longest_at, longest


def _read_jsonl(path: Path, out: ReadResult, text_field: str) -> None:
    for number, line in enumerate(path.read_bytes().removeprefix(BOM).split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        text, problem = _decode(line.rstrip(b"\r"), where)
        if problem:
            out.row_problems.append(problem)
            continue
        obj, _, problem = parse_json(text)
        if problem:
            out.row_problems.append(f"{where}: {problem}")
            continue
        if isinstance(obj, dict):
            out.records.append(Record(where, obj))
        else:
            out.row_problems.append(f"{where}: expected a JSON object {{...}}, got {type_name(obj)}")


def _read_json(path: Path, out: ReadResult, text_field: str) -> None:
    text, problem = _decode_file(path, path.read_bytes().removeprefix(BOM))
    if problem:
        out.file_problems.append(problem)
        return
    obj, offset, problem = parse_json(text)
    if problem:
        line = text.count("\n", 0, offset) + 1
        out.file_problems.append(f"{path}:{line}: {problem}")
        return
    if isinstance(obj, dict):
        lists = [value for value in obj.values() if isinstance(value, list)]
        if len(lists) != 1:
            out.file_problems.append(f"{path}: expected an array of objects, or an object holding exactly one "
                                     f"array; found keys {sorted(obj)}")
            return
        obj = lists[0]
    if not isinstance(obj, list):
        out.file_problems.append(f"{path}: expected an array of objects, got {type_name(obj)}")
        return
    for number, item in enumerate(obj, 1):
        where = f"{path}:item {number}"
        if isinstance(item, dict):
            out.records.append(Record(where, item))
        else:
            out.row_problems.append(f"{where}: expected an object {{...}}, got {type_name(item)}")


def _read_csv(path: Path, out: ReadResult, text_field: str) -> None:
    raw_lines = path.read_bytes().removeprefix(BOM).split(b"\n")
    lines, bad = [], set()
    for number, raw in enumerate(raw_lines, 1):
        text, problem = _decode(raw.rstrip(b"\r"), f"{path}:{number}")
        if problem:
            out.row_problems.append(problem)
            bad.add(number)
            text = raw.decode("utf-8", errors="replace")
        lines.append(text + "\n")
    reader = csv.reader(lines)
    header: list[str] | None = None
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or bad.intersection(range(start, end + 1)):
                continue  # blank line, or a line already reported as undecodable
            if header is None:
                header = row
            elif len(row) != len(header):
                out.row_problems.append(f"{path}:{start}: expected {len(header)} columns as in the header, "
                                        f"got {len(row)}")
            else:
                out.records.append(Record(f"{path}:{start}", dict(zip(header, row))))
    except csv.Error as exc:
        out.file_problems.append(f"{path}:{reader.line_num}: not valid CSV ({exc})")


def _read_parquet(path: Path, out: ReadResult, text_field: str) -> None:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt or foreign files
        out.file_problems.append(f"{path}: not a readable Parquet file ({exc})")
        return
    out.records.extend(Record(f"{path}:row {number}", row) for number, row in enumerate(rows, 1))


def _read_text(path: Path, out: ReadResult, text_field: str) -> None:
    text, problem = _decode_file(path, path.read_bytes().removeprefix(BOM))
    if problem:
        out.row_problems.append(problem)
    else:
        out.records.append(Record(str(path), {text_field: text}))


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet, ".txt": _read_text, ".md": _read_text}
