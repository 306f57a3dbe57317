"""Bad input, everywhere, as a property.

Every reader (config YAML and ``key=value`` overrides, every data format, model folders, adapter folders,
checkpoints) is fed broken input through the stable entry points only (``lmadapt.cli.main`` and the
top-level API) and must answer with:

- a non-zero exit (2 on the command line) or an :class:`lmadapt.errors.LmadaptError` from the API,
- no traceback,
- a message naming the offending file (and its line, item or field where the format has them),
- nothing written: a training run's ``output_dir`` is not created (or, with ``--resume``, left exactly as
  it was), and ``merge`` writes no output folder.

Hand-made bad files live in ``tests/corpora/bad_input/`` (see its README); random ones come from
``hypothesis`` (small ``max_examples``, derandomized, so the file stays fast and deterministic). Inputs
are chosen to fail validation before any training step runs; the one trained run (for adapters and
checkpoints) is made once per module.

Tests marked ``xfail(strict=True)`` are known defects: the reason says what happens today. A fix flips
them to XPASS, which fails the suite until the mark is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import lmadapt
from lmadapt.cli import main
from lmadapt.errors import LmadaptError

from conftest import make_rows, write_jsonl

CORPUS = Path(__file__).parent / "corpora" / "bad_input"

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: an xfail would spend minutes on it
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# ------------------------------------------------------------------------------------------------ helpers

@dataclass
class Outcome:
    rc: int | None
    err: str
    out: str
    exc: BaseException | None = None


def cli(*argv: object) -> Outcome:
    """``main(argv)`` with stdout/stderr captured; an exception escaping main is what a user sees as a
    traceback, so it is returned as rc=None with the formatted traceback in ``err``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # noqa: BLE001 - the defect under test
            return Outcome(None, err.getvalue() + traceback.format_exc(), out.getvalue(), exc)
    return Outcome(rc, err.getvalue(), out.getvalue())


def raised_where(exc: BaseException) -> str:
    """``Type: message`` and the innermost lmadapt frame (file:function) and the innermost frame overall."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/lmadapt/" in f.filename]

    def fmt(f: traceback.FrameSummary) -> str:
        return f"{f.filename.split('/src/')[-1].split('site-packages/')[-1]}:{f.name}:{f.lineno}"

    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return (f"{type(exc).__name__}: {text} | lmadapt: {fmt(ours[-1]) if ours else '-'}"
            f" | raised in: {fmt(frames[-1]) if frames else '-'}")


def assert_refused(res: Outcome, *must_name: str) -> None:
    """Exit 2, no traceback, and every string of ``must_name`` in the message."""
    shown = res.err[-4000:]
    if res.exc is not None:
        raise AssertionError(f"traceback: {raised_where(res.exc)}\n{shown}")
    assert "Traceback" not in res.err + res.out, f"traceback instead of a message:\n{shown}"
    assert res.rc == 2, f"exit code {res.rc}, expected 2:\n{shown}"
    for name in must_name:
        assert name in res.err, f"the message does not name {name!r}: {res.err.strip()[-300:]!r}"


def api_refused(call, *must_name: str) -> LmadaptError:
    """``call()`` raises an LmadaptError (not another exception) whose message names ``must_name``."""
    try:
        call()
    except LmadaptError as exc:
        for name in must_name:
            assert name in str(exc), f"the message does not name {name!r}:\n{exc}"
        return exc
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {raised_where(exc)}\n{traceback.format_exc()[-3000:]}")
    pytest.fail("no error raised")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes ("dir" for folders)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def fresh_dir(base: Path) -> Path:
    """A new empty folder under ``base`` (one per hypothesis example)."""
    return Path(tempfile.mkdtemp(dir=base))


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_config(model_dir: Path, train_file: Path, output_dir: Path, **extra: object) -> dict:
    """A small complete config on the tiny model (valid unless ``extra`` breaks it)."""
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(train_file)], "max_length": 128},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 2, "tensorboard": False, "schedule": "constant",
                  "threads": 1},
        "output_dir": str(output_dir),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def train_refused(folder: Path, cfg: dict, *must_name: str, overrides: tuple = ()) -> Outcome:
    """``lmadapt train`` on ``cfg`` (written into ``folder``) is refused and writes nothing in ``folder``."""
    cfg_path = write_config(folder / "cfg.yaml", cfg)
    before = snapshot(folder)
    res = cli("train", cfg_path, *overrides, "--no-progress")
    assert_refused(res, *must_name)
    assert not Path(cfg["output_dir"]).exists(), f"{cfg['output_dir']} was created before the input was validated"
    assert snapshot(folder) == before, "files were written before the input was validated"
    return res


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good-data") / "train.jsonl"
    write_jsonl(path, make_rows(16))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, good_data) -> Path:
    """One real 3-step run with checkpoints at steps 1 and 2 (none at the end): its adapter and checkpoints
    are corrupted in copies."""
    root = tmp_path_factory.mktemp("trained")
    cfg = run_config(tiny_model_dir, good_data, root / "run", train={"save_every": 1, "keep_last": 2,
                                                                     "max_steps": 3})
    lmadapt.train(cfg, progress=False)
    run = root / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-0000002" / "optimizer.safetensors").is_file()
    return run


# ------------------------------------------------------------------------------------------------ config

CONFIG_CASES = {
    # file in corpora/bad_input/config: what the message must contain besides the file name
    "latin1.yaml": ["line 3", "UTF-8"],
    "lone_surrogate.yaml": ["line 1", "UTF-8"],
    "utf16.yaml": ["line 1", "UTF-8"],
    "deep.yaml": ["line 1", "nested too deeply"],
    "bigint.yaml": ["line 2", "number too long"],
    "bad_date.yaml": ["line 3", "2024-13-45"],
    "python_tag.yaml": ["line 1"],
    "top_level_list.yaml": ["mapping"],
    "tab_indent.yaml": ["line 2"],
    "unhashable_key.yaml": ["line 1"],
    "nul_byte.yaml": ["line 2, column 11"],
    "method_name_list.yaml": ["method.name: expected a method name (a string), got list"],
    "method_name_int.yaml": ["method.name"],
}
@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_corpus(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the corpus configs name relative output folders: nothing may appear here
    res = cli("train", CORPUS / "config" / name, "--no-progress")
    assert_refused(res, name, *CONFIG_CASES[name])
    assert snapshot(tmp_path) == {}


def says(res: Outcome, *words: str, besides: Path) -> bool:
    """Whether the message holds one of ``words`` outside the path ``besides`` (tmp paths hold test names)."""
    text = res.err.replace(str(besides), "<path>").lower()
    return any(w in text for w in words)


def test_config_path_is_a_directory(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    res = cli("train", folder, "--no-progress")
    assert_refused(res, "configs")
    assert says(res, "is a directory", "is a folder", besides=folder), res.err


def test_config_path_missing(tmp_path):
    assert_refused(cli("train", tmp_path / "nope.yaml", "--no-progress"), "nope.yaml")


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
@example(raw=b"train:\n  lr: \xff\n")
def test_config_random_bytes(raw, tmp_path_factory):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    cfg = folder / "fuzz.yaml"
    cfg.write_bytes(raw)
    res = cli("train", cfg, f"output_dir={folder / 'run'}", "--no-progress")
    assert_refused(res, "fuzz.yaml")
    assert not (folder / "run").exists()


@FUZZ
@given(text=st.text(max_size=200))
def test_config_random_utf8_text(text, tmp_path_factory):
    """Any valid UTF-8 text (no data.train: it can never train) is refused with the file's name."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    cfg = folder / "fuzz.yaml"
    cfg.write_text(text, encoding="utf-8")
    res = cli("train", cfg, f"output_dir={folder / 'run'}", "--no-progress")
    assert_refused(res, "fuzz.yaml")
    assert not (folder / "run").exists()


@FUZZ
@given(text=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0xDFFF), min_size=1, max_size=60),
       surrogate=st.integers(0xD800, 0xDFFF))
def test_config_with_lone_surrogates(text, surrogate, tmp_path_factory):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    cfg = folder / "fuzz.yaml"
    cfg.write_bytes(f"output_dir: {text}{chr(surrogate)}\n".encode("utf-8", "surrogatepass"))
    res = cli("train", cfg, "--no-progress")
    assert_refused(res, "fuzz.yaml", "UTF-8")


@FUZZ
@given(depth=st.integers(1, 5000), kind=st.sampled_from(["[", "{a: "]))
@example(depth=3000, kind="[")
def test_config_random_nesting_depth(depth, kind, tmp_path_factory):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    cfg = folder / "fuzz.yaml"
    close = "]" if kind == "[" else "}"
    cfg.write_text("output_dir: " + kind * depth + "x" + close * depth + "\n", encoding="utf-8")
    res = cli("train", cfg, "--no-progress")
    assert_refused(res, "fuzz.yaml")


def test_config_alias_bomb_gives_a_short_message(tmp_path):
    """YAML aliases expand a small file into a huge value; the error must not print it whole."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 5)]  # 10^5 leaves
    lines.append("output_dir: *a4")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    res = cli("train", cfg, "--no-progress")
    assert_refused(res, "bomb.yaml", "output_dir")
    assert len(res.err) < 20_000, f"a {len(res.err):,}-character message"


# random config structures: known keys with random values (never data.train, so it can never train)
_KEYS = ["name_or_path", "dtype", "device", "trust_remote_code", "train", "validation", "format", "max_length",
         "batching", "truncation", "name", "r", "alpha", "target_modules", "init", "lr", "batch_size",
         "max_steps", "save_every", "precision", "schedule", "task", "data", "labels", "junk"]
_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
_VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3), max_leaves=8)
_SECTIONS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4)
_CONFIGS = st.dictionaries(
    st.sampled_from(["model", "data", "method", "train", "evals", "init_adapter", "overwrite", "junk"]),
    _SECTIONS | _VALUES | st.lists(_SECTIONS, max_size=2), max_size=5)


@FUZZ
@given(data=_CONFIGS)
@example(data={"method": {"name": [1]}})
@example(data={"method": {"name": 5}})
def test_config_random_structures(data, tmp_path_factory):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    if isinstance(data.get("data"), dict):
        data["data"].pop("train", None)
    cfg = folder / "fuzz.yaml"
    cfg.write_text(yaml.safe_dump({**data, "output_dir": str(folder / "run")}), encoding="utf-8")
    res = cli("train", cfg, "--no-progress")
    assert_refused(res, "fuzz.yaml")
    assert not (folder / "run").exists()


# ------------------------------------------------------------------------------------------------ overrides

_OVERRIDE_KEYS = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00="), max_size=12),
    st.lists(st.sampled_from(["model", "data", "method", "train", "name", "r", "lr", "x", ""]), min_size=1,
             max_size=3).map(".".join),
)
_OVERRIDE_VALUES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20),
    st.sampled_from(["[", "{", "!!python/name:os.system", "*x", "&x", "1e999", "-.inf", "~", "[1, [2]]",
                     "{a: {b: c}}", "2024-13-45", "?", "|", "'", '"']),
)


@FUZZ
@given(pairs=st.lists(st.tuples(_OVERRIDE_KEYS, _OVERRIDE_VALUES), min_size=1, max_size=4))
@example(pairs=[("train.seed", "7" * 5000)])
@example(pairs=[("output_dir", "[" * 3000)])
@example(pairs=[("method.name", "[lora]")])
def test_override_random_strings(pairs, tmp_path_factory, tiny_model_dir):
    """A config without data.train plus random ``key=value`` overrides (never data.train) is refused."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    overrides = [f"{k}={v}" for k, v in pairs if not k.strip().startswith(("data", "-"))]
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "output_dir": str(folder / "run")}
    cfg_path = write_config(folder / "fuzz.yaml", cfg)
    res = cli("train", cfg_path, *overrides, "--no-progress")
    assert_refused(res)
    assert "fuzz.yaml" in res.err or "override" in res.err, res.err
    assert sorted(p.name for p in folder.iterdir()) == ["fuzz.yaml"]


@pytest.mark.parametrize("override,named", [
    pytest.param("train.seed=" + "7" * 5000, "train.seed", id="bigint"),
    pytest.param("output_dir=" + "[" * 3000 + "]" * 3000, "output_dir", id="deep"),
    pytest.param("method.name=[lora]", "method.name", id="method-name-list"),
    pytest.param("output_dir=2024-13-45", "output_dir", id="bad-date"),
    pytest.param("train.lr", "train.lr", id="no-equals"),
    pytest.param("train.lr=fast", "train.lr", id="bad-float"),
    pytest.param("train=1", "train", id="section-as-scalar"),
    pytest.param("train.lr=\udcff", "train.lr", id="undecodable-argv"),  # arrives as a lone surrogate
])
def test_override_corpus(override, named, tmp_path, train_file, tiny_model_dir):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run")
    train_refused(tmp_path, cfg, named, overrides=(override,))


# ------------------------------------------------------------------------------------------------ data files

DATA_CASES = {
    # file in corpora/bad_input/data: what the message must contain (file:line, item, field)
    "invalid_utf8.jsonl": ["invalid_utf8.jsonl:2", "UTF-8"],
    "surrogate_bytes.jsonl": ["surrogate_bytes.jsonl:2", "UTF-8"],
    "surrogate_escape.jsonl": ["surrogate_escape.jsonl:2", "prompt"],
    "bigint.jsonl": ["bigint.jsonl:2", "number too long"],
    "deep.jsonl": ["deep.jsonl:2", "nested too deeply"],
    "not_object.jsonl": ["not_object.jsonl:2"],
    "truncated.jsonl": ["truncated.jsonl:2"],
    "empty.jsonl": ["empty.jsonl: holds no rows"],
    "blank_lines.jsonl": ["blank_lines.jsonl: holds no rows"],
    "invalid_utf8.csv": ["invalid_utf8.csv:3", "UTF-8"],
    "ragged.csv": ["ragged.csv:3"],
    "deep.json": ["deep.json:1", "nested too deeply"],
    "surrogate_escape.json": ["surrogate_escape.json:item 2", "prompt"],
    "bigint.json": ["bigint.json:1", "number too long"],
    "truncated.json": ["truncated.json:2"],
    "invalid_utf8.txt": ["invalid_utf8.txt:2", "UTF-8"],
    "corrupt.parquet": ["corrupt.parquet"],
}
@pytest.mark.parametrize("name", list(DATA_CASES))
def test_data_corpus(name, tmp_path, tiny_model_dir):
    cfg = run_config(tiny_model_dir, CORPUS / "data" / name, tmp_path / "run")
    train_refused(tmp_path, cfg, *DATA_CASES[name])


def test_bad_validation_file_is_named(tmp_path, train_file, tiny_model_dir):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run",
                     data={"validation": [str(CORPUS / "data" / "truncated.json")]})
    train_refused(tmp_path, cfg, "truncated.json:2")


def _line_strategy():
    """One non-blank line of random bytes, or random text with lone surrogates written via surrogatepass."""
    raw = st.binary(min_size=1, max_size=80)
    text = st.text(alphabet=st.characters(max_codepoint=0xDFFF), min_size=1, max_size=40).map(
        lambda s: s.encode("utf-8", "surrogatepass"))
    quoted = st.text(alphabet=st.characters(max_codepoint=0xDFFF), max_size=20).map(
        lambda s: ('{"prompt": "' + s + '", "completion": " x"}').encode("utf-8", "surrogatepass"))
    return st.one_of(raw, text, quoted).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: b.strip())


@FUZZ
@given(line=_line_strategy())
@example(line='{"prompt": "\ud800", "completion": " x"}'.encode("utf-8", "surrogatepass"))
@example(line=b"\xff\xfe")
def test_jsonl_random_second_line(line, tmp_path_factory, tiny_model_dir):
    """A good first row and a random second line: refused, naming file:2 (the row problem)."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    data = folder / "fuzz.jsonl"
    data.write_bytes(json.dumps(make_rows(1)[0]).encode() + b"\n" + line + b"\n")
    try:  # a random line may be a valid row: then there is nothing to refuse
        obj = json.loads(line.decode("utf-8"))
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str) \
                and not any(0xD800 <= ord(c) <= 0xDFFF for c in obj["prompt"] + obj["completion"]) \
                and obj["completion"]:
            return
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    cfg = run_config(tiny_model_dir, data, folder / "run")
    train_refused(folder, cfg, "fuzz.jsonl:2")


@FUZZ
@given(text=st.text(alphabet=st.characters(max_codepoint=0xFFFF), max_size=10),
       surrogate=st.integers(0xD800, 0xDFFF), field=st.sampled_from(["prompt", "completion"]))
def test_jsonl_escaped_lone_surrogates(text, surrogate, field, tmp_path_factory, tiny_model_dir):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    data = folder / "fuzz.jsonl"
    row = {"prompt": "Text: goal\nTopic:", "completion": " sport"}
    row[field] = text + chr(surrogate)
    data.write_text(json.dumps(make_rows(1)[0]) + "\n" + json.dumps(row) + "\n", encoding="utf-8")  # \ud800 escapes
    cfg = run_config(tiny_model_dir, data, folder / "run")
    train_refused(folder, cfg, "fuzz.jsonl:2", field)


@FUZZ
@given(depth=st.integers(1, 20000), fmt=st.sampled_from(["jsonl", "json"]))
@example(depth=5000, fmt="jsonl")
@example(depth=5000, fmt="json")
def test_json_random_nesting_depth(depth, fmt, tmp_path_factory, tiny_model_dir):
    """An object nested ``depth`` deep in a row (JSONL line 2 / JSON item 2): refused, naming where."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    nested = '{"a": ' * depth + "1" + "}" * depth
    good = json.dumps(make_rows(1)[0])
    bad = '{"prompt": ' + nested + ', "completion": " x"}'
    data = folder / f"fuzz.{fmt}"
    if fmt == "jsonl":
        data.write_text(good + "\n" + bad + "\n", encoding="utf-8")
        where = "fuzz.jsonl:2"
    else:
        data.write_text("[" + good + ",\n" + bad + "]", encoding="utf-8")
        where = "fuzz.json"
    cfg = run_config(tiny_model_dir, data, folder / "run")
    train_refused(folder, cfg, where)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
def test_csv_random_bytes(raw, tmp_path_factory, tiny_model_dir):
    """A header, a good row, a ragged row, then random bytes: refused, naming the file."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    data = folder / "fuzz.csv"
    data.write_bytes(b"prompt,completion\n\"Text: goal\",\" sport\"\n,,,\n" + raw + b"\n")
    cfg = run_config(tiny_model_dir, data, folder / "run")
    train_refused(folder, cfg, "fuzz.csv")


@FUZZ
@given(raw=st.binary(max_size=300), keep_magic=st.booleans())
def test_parquet_random_bytes(raw, keep_magic, tmp_path_factory, tiny_model_dir):
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    data = folder / "fuzz.parquet"
    data.write_bytes(b"PAR1" + raw + b"PAR1" if keep_magic else raw)
    cfg = run_config(tiny_model_dir, data, folder / "run")
    train_refused(folder, cfg, "fuzz.parquet")


def test_truncated_real_parquet(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist(make_rows(8)), whole)
    data = tmp_path / "cut.parquet"
    data.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cfg = run_config(tiny_model_dir, data, tmp_path / "run")
    train_refused(tmp_path, cfg, "cut.parquet")


def test_parquet_with_binary_prompt_column(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"Text: goal", b"\xff\xfe"], pa.binary()),
                             "completion": [" sport", " food"]}), data)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run")
    train_refused(tmp_path, cfg, "binary.parquet:row 1", "prompt")


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
def test_txt_random_bytes_with_a_bad_byte(raw, tmp_path_factory, tiny_model_dir):
    """Plain text with an invalid UTF-8 byte on line 2: refused naming file:2."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    data = folder / "fuzz.txt"
    data.write_bytes(b"first line\n\xff" + raw)
    cfg = run_config(tiny_model_dir, data, folder / "run", data={"format": "text"})
    train_refused(folder, cfg, "fuzz.txt:2", "UTF-8")


@pytest.mark.parametrize("content", ["empty", "only_subfolders", "unsupported_files"])
def test_data_train_is_a_directory_without_data_files(content, tmp_path, tiny_model_dir):
    folder = tmp_path / "datadir"
    folder.mkdir()
    if content == "only_subfolders":
        (folder / "part.jsonl").mkdir()
        write_jsonl(folder / "part.jsonl" / "rows.jsonl", make_rows(4))
    elif content == "unsupported_files":
        (folder / "rows.xlsx").write_bytes(b"PK\x03\x04")
    cfg = run_config(tiny_model_dir, folder, tmp_path / "run")
    res = train_refused(tmp_path, cfg, "datadir")
    assert says(res, "directory", "folder", besides=folder), res.err


def test_data_train_is_a_directory_via_override(tmp_path, train_file, tiny_model_dir):
    folder = tmp_path / "datadir"
    folder.mkdir()
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run")
    train_refused(tmp_path, cfg, "datadir", overrides=(f"data.train=[{folder}]",))


@pytest.mark.parametrize("data,named", [(CORPUS / "data" / "truncated.jsonl", ["truncated.jsonl:2"]),
                                        ("no-such-eval.jsonl", ["evals[1].data", "no-such-eval.jsonl"])])
def test_bad_eval_data_stops_before_anything_is_written(data, named, tmp_path, train_file, tiny_model_dir):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run",
                     evals=[{"task": "perplexity", "data": [str(train_file)], "text_field": "prompt"},
                            {"task": "perplexity", "data": [str(data)]}])
    train_refused(tmp_path, cfg, *named)


# ------------------------------------------------------------------------------------------------ model folders

def _model_copy(tiny_model_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage,named", [
    ("truncated_weights", "model.safetensors"),
    ("garbage_weights", "model.safetensors"),
    ("pickle_only", "pytorch_model.bin"),  # refused before it is opened, unless model.allow_pickle=true
    ("garbage_pickle_only", "pytorch_model.bin"),
    ("no_weights", "model"),
    ("config_not_json", "config.json"),
    ("config_not_utf8", "config.json"),
    ("config_not_object", "config.json"),
    ("tokenizer_truncated", "tokenizer.json"),
    ("tokenizer_config_truncated", "tokenizer_config.json"),
])
def test_bad_model_folder(damage, named, tmp_path, good_data, tiny_model_dir):
    model = _model_copy(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    if damage == "truncated_weights":
        _truncate(weights)
    elif damage == "garbage_weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "pickle_only":
        import torch

        from lmadapt.testing import tiny_llama

        torch.save(tiny_llama().state_dict(), model / "pytorch_model.bin")
        weights.unlink()
    elif damage == "garbage_pickle_only":
        (model / "pytorch_model.bin").write_bytes(b"not a pickle; must never be unpickled")
        weights.unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "config_not_json":
        _truncate(model / "config.json")
    elif damage == "config_not_utf8":
        (model / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    elif damage == "config_not_object":
        (model / "config.json").write_text("[]")
    elif damage == "tokenizer_truncated":
        _truncate(model / "tokenizer.json")
    elif damage == "tokenizer_config_truncated":
        _truncate(model / "tokenizer_config.json")
    out = tmp_path / "work"
    out.mkdir()
    cfg = run_config(model, good_data, out / "run")
    res = train_refused(out, cfg, named)
    if "pickle" in damage:
        assert "model.allow_pickle=true" in res.err and "safetensors" in res.err, res.err


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b"[]")
@example(raw=b'{"a": "caf\xe9"}')
@example(raw=b"[" * 5000)
def test_inspect_model_config_random_bytes(raw, tmp_path_factory):
    folder = fresh_dir(tmp_path_factory.getbasetemp()) / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(raw)
    res = cli("inspect", folder)
    if res.rc == 0:
        return  # the bytes happened to be a JSON object: inspect reports what it holds
    assert_refused(res, "config.json")


# ------------------------------------------------------------------------------------------------ adapter folders

def _adapter_copy(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run / "adapter", dest)
    return dest


def _merge_refused(adapter: Path, model: Path, tmp_path: Path, *named: str) -> Outcome:
    out = tmp_path / "merged"
    res = cli("merge", "--model", model, "--adapter", adapter, "--output", out)
    assert_refused(res, *named)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    return res


ADAPTER_CASES = ["list.json", "string.json", "null.json", "latin1.json", "lone_surrogate.json", "deep.json",
                 "truncated.json", "record_not_object.json", "record_without_method.json",
                 "record_method_not_object.json"]


@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_adapter_config_corpus(name, tmp_path, trained_run, tiny_model_dir):
    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    shutil.copy(CORPUS / "adapter_config" / name, adapter / "adapter_config.json")
    _merge_refused(adapter, tiny_model_dir, tmp_path, "adapter_config.json")


def test_peft_adapter_config_with_bad_field_types(tmp_path, trained_run, tiny_model_dir):
    """A PEFT adapter (no lmadapt record in the weights header) whose adapter_config.json has wrong types."""
    from safetensors.torch import load_file, save_file

    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    shutil.copy(CORPUS / "adapter_config" / "peft_bad_types.json", adapter / "adapter_config.json")
    _merge_refused(adapter, tiny_model_dir, tmp_path, "adapter_config.json")


_NOT_OBJECTS = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3), max_leaves=6)


@FUZZ
@given(value=_NOT_OBJECTS)
def test_inspect_adapter_config_not_an_object(value, tmp_path_factory, trained_run):
    folder = _adapter_copy(trained_run, fresh_dir(tmp_path_factory.getbasetemp()) / "adapter")
    (folder / "adapter_config.json").write_text(json.dumps(value), encoding="utf-8")
    assert_refused(cli("inspect", folder), "adapter_config.json")


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
@example(raw="{\"peft_type\": \"\ud800\"}".encode("utf-8", "surrogatepass"))
@example(raw=b"[" * 5000)
def test_inspect_adapter_config_random_bytes(raw, tmp_path_factory, trained_run):
    folder = _adapter_copy(trained_run, fresh_dir(tmp_path_factory.getbasetemp()) / "adapter")
    (folder / "adapter_config.json").write_bytes(raw)
    res = cli("inspect", folder)
    if res.rc == 0:
        return  # e.g. b"{}": the safetensors header carries the record
    assert_refused(res, "adapter_config.json")


_ADAPTER_KEYS = ["lmadapt", "peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                 "base_model_name_or_path", "use_rslora", "method", "name"]
_ADAPTER_VALUES = st.recursive(
    _SCALARS | st.sampled_from(["LORA", "lora", "q_proj", "IA3"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(_ADAPTER_KEYS), c, max_size=3),
    max_leaves=8)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(_ADAPTER_KEYS), _ADAPTER_VALUES, max_size=5))
@example(config={"lmadapt": 5})
@example(config={"lmadapt": {"base_model": "x"}})
@example(config={"peft_type": "LORA", "r": "four", "target_modules": 5})
def test_load_random_adapter_config(config, tmp_path_factory, trained_run, tiny_model_dir):
    """``lmadapt.load`` with a random adapter_config.json object: loads, or raises an LmadaptError naming
    the adapter."""
    folder = _adapter_copy(trained_run, fresh_dir(tmp_path_factory.getbasetemp()) / "fuzz-adapter")
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        lmadapt.load(str(tiny_model_dir), folder)
    except LmadaptError as exc:
        assert "fuzz-adapter" in str(exc), str(exc)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {raised_where(exc)}\n{traceback.format_exc()[-3000:]}")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header_only"])
def test_bad_adapter_weights_merge(damage, tmp_path, trained_run, tiny_model_dir):
    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncated":
        _truncate(weights)
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "header_only":
        data = weights.read_bytes()
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    _merge_refused(adapter, tiny_model_dir, tmp_path, "adapter_model.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_adapter_weights_inspect(damage, tmp_path, trained_run):
    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncated":
        _truncate(weights)
    else:
        weights.write_bytes(b"\x00" * 64)
    assert_refused(cli("inspect", adapter), "adapter_model.safetensors")


def test_bad_adapter_weights_api(tmp_path, trained_run, tiny_model_dir):
    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    _truncate(adapter / "adapter_model.safetensors")
    api_refused(lambda: lmadapt.load(str(tiny_model_dir), adapter), "adapter_model.safetensors")


def test_adapter_with_only_a_pickle(tmp_path, trained_run, tiny_model_dir):
    adapter = _adapter_copy(trained_run, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    _merge_refused(adapter, tiny_model_dir, tmp_path, "adapter_model.bin", "safetensors")


def test_adapter_path_is_a_file(tmp_path, tiny_model_dir):
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"\x00" * 16)
    _merge_refused(file, tiny_model_dir, tmp_path, "adapter.safetensors")


def test_inspect_path_is_a_file_or_missing(tmp_path):
    file = tmp_path / "thing.json"
    file.write_text("{}")
    assert_refused(cli("inspect", file), "thing.json")
    assert_refused(cli("inspect", tmp_path / "missing"), "missing")


@pytest.mark.parametrize("damage", ["missing", "config_not_object", "truncated_weights"])
def test_bad_init_adapter_stops_before_anything_is_written(damage, tmp_path, trained_run, good_data,
                                                           tiny_model_dir):
    adapter = tmp_path / "init"
    if damage != "missing":
        _adapter_copy(trained_run, adapter)
    if damage == "config_not_object":
        (adapter / "adapter_config.json").write_text("[]")
    elif damage == "truncated_weights":
        _truncate(adapter / "adapter_model.safetensors")
    out = tmp_path / "work"
    out.mkdir()
    cfg = run_config(tiny_model_dir, good_data, out / "run", init_adapter=str(adapter))
    train_refused(out, cfg, "init")


def test_init_adapter_of_another_method_stops_before_anything_is_written(tmp_path, trained_run, good_data,
                                                                        tiny_model_dir):
    adapter = _adapter_copy(trained_run, tmp_path / "init")
    cfg = {**run_config(tiny_model_dir, good_data, tmp_path / "work" / "run", init_adapter=str(adapter)),
           "method": {"name": "full"}}
    (tmp_path / "work").mkdir()
    train_refused(tmp_path / "work", cfg, "init_adapter", "'lora'", "method.name")


# ------------------------------------------------------------------------------------------------ checkpoints

def _resume_copy(trained_run: Path, tmp_path: Path, tiny_model_dir: Path, good_data: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = run_config(tiny_model_dir, good_data, run, train={"save_every": 1, "keep_last": 2, "max_steps": 4})
    return write_config(tmp_path / "cfg.yaml", cfg), run


def _resume_refused(cfg: Path, run: Path, *named: str) -> Outcome:
    before = snapshot(run)
    res = cli("train", cfg, "--resume", "--no-progress")
    assert_refused(res, *named)
    assert snapshot(run) == before, "the run folder was changed before the checkpoint was validated"
    return res


LAST = Path("checkpoints") / "step-0000002"


@pytest.mark.parametrize("file,damage", [
    ("optimizer.safetensors", "truncate"),
    ("optimizer.safetensors", "garbage"),
    ("rng.safetensors", "truncate"),
    ("rng.safetensors", "no_cpu_state"),
    ("trainer_state.json", "truncate"),
    ("trainer_state.json", "not_object"),
    ("trainer_state.json", "not_utf8"),
    ("trainer_state.json", "missing_keys"),
    ("trainer_state.json", "bad_python_rng"),
    ("adapter/adapter_model.safetensors", "truncate"),
])
def test_resume_from_a_bad_checkpoint(file, damage, tmp_path, trained_run, tiny_model_dir, good_data):
    cfg, run = _resume_copy(trained_run, tmp_path, tiny_model_dir, good_data)
    path = run / LAST / file
    if damage == "truncate":
        _truncate(path)
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "not_object":
        path.write_text("[]")
    elif damage == "not_utf8":
        path.write_bytes(b'{"step": 2, "note": "caf\xe9"}')
    elif damage == "missing_keys":
        path.write_text(json.dumps({"step": 2}))
    elif damage == "no_cpu_state":
        from safetensors.torch import save_file

        save_file({}, str(path))
    elif damage == "bad_python_rng":
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "python_rng": [3, [1, 2], None]}))
    res = _resume_refused(cfg, run, "step-0000002", Path(file).name)
    assert "delete" in res.err and "step-0000001" in res.err, res.err  # what to do: resume from the one before


def test_resume_with_another_rank_names_the_config_it_was_started_with(tmp_path, trained_run, tiny_model_dir,
                                                                     good_data):
    cfg, run = _resume_copy(trained_run, tmp_path, tiny_model_dir, good_data)
    before = snapshot(run)
    res = cli("train", cfg, "method.r=8", "--resume", "--no-progress")
    assert_refused(res, "method.r: run has 4, now 8", "config.yaml")  # refused before the checkpoint is read
    assert snapshot(run) == before


def test_resume_with_a_foreign_checkpoint_folder_name(tmp_path, trained_run, tiny_model_dir, good_data):
    """A copied checkpoint named step-latest (complete otherwise) is ignored or named, never a ValueError
    (the sort key of checkpoint_dirs was int(name.split('-')[1]))."""
    cfg, run = _resume_copy(trained_run, tmp_path, tiny_model_dir, good_data)
    shutil.copytree(run / LAST, run / "checkpoints" / "step-latest")
    res = cli("train", cfg, "--resume", "--no-progress")
    if res.rc != 0:
        assert_refused(res, "step-latest")
    assert res.exc is None and "Traceback" not in res.err
