"""Reading JSON files: every failure names the file and where in it, as a LmadaptError."""

from __future__ import annotations

import pytest

from lmadapt.errors import LmadaptError
from lmadapt.jsonfile import JsonFileError, read_json, read_json_object


@pytest.mark.parametrize("raw,problem", [
    (b'{"a": 1,\n "b": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at line 2, column 11)"),
    (b'{"a": 1,\n "b": }', "not valid JSON at line 2, column 7 (Expecting value)"),
    (b"[" * 100_000 + b"]" * 100_000, "not readable: nested too deeply"),
    (b'{"n": ' + b"7" * 5000 + b"}", "not readable: Exceeds the limit (4300 digits)"),
])
def test_bad_json_names_the_file_and_the_place(raw, problem, tmp_path):
    path = tmp_path / "thing.json"
    path.write_bytes(raw)
    with pytest.raises(JsonFileError) as err:
        read_json(path)
    assert isinstance(err.value, LmadaptError) and err.value.path == path
    assert str(err.value).startswith(f"{path}: {problem}"), str(err.value)


@pytest.mark.parametrize("text,kind", [("[]", "list"), ("null", "null"), ('"x"', "str"), ("3", "int")])
def test_read_json_object_refuses_other_values(text, kind, tmp_path):
    path = tmp_path / "thing.json"
    path.write_text(text)
    with pytest.raises(JsonFileError, match=rf"expected a JSON object \{{\.\.\.\}}, got {kind}$"):
        read_json_object(path)
    path.write_text('{"a": [1, 2]}')
    assert read_json_object(path) == {"a": [1, 2]}


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(JsonFileError, match=r"missing.json: not readable \(No such file or directory\)"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(JsonFileError, match=r"not readable \(Is a directory\)"):
        read_json(tmp_path)
