"""The docs name only run-config keys that exist (``lmadapt config-help``) and quote their defaults as the code
has them; the README's measured figures are backed by the page each of its lines links to.

Keys are found where the docs write them: in backticks as dotted paths (`train.lr`, `model.dtype=bf16`,
`add_eos: true`), in ```yaml blocks, in `lmadapt train ... key=value` commands, and in the first column of
key tables (``| key | default | ... |``, ``| setting (`train:`) | ... |``). Defaults are read from those tables
and from sentences such as "`max_new_tokens` (default 16)", "`nan_policy: stop` (default)" and
"`model.dtype`'s default, `auto`".
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from lmadapt.api import config_reference
from lmadapt.data.dataset import DataReport
from lmadapt.methods.base import Method
from lmadapt.objectives.base import Objective
from lmadapt.recipes.finetune import load_run_config
from lmadapt.testing import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "methods").glob("*.md")) + [ROOT / "README.md"]
SECTIONS = ("model", "data", "train", "evals[]", "method", "objective")
# Pages that document one section, so that a bare key in their sentences ("`max_length` (default 1024)") is
# that section's. Pages not listed here are only read for dotted keys.
PAGE_SECTION = {"data.md": "data", "training.md": "train", "models.md": "model", "evaluation.md": "evals[]"}
# The make-helper and vas-train configs have keys of their own (their pages' tables); config-help is the run's.
OTHER_CONFIG_PAGES = {"helper_models.md", "vas.md"}
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "py", "bin", "yaml", "txt", "md", "png", "jinja"}


def _reference() -> dict[str, dict[str, set[str]]]:
    """section -> key -> the defaults config-help gives it (a method or objective key may have one per name);
    methods' and objectives' keys also under ``method[NAME]`` / ``objective[NAME]``."""
    ref: dict[str, dict[str, set[str]]] = {}
    for full, _, default, _ in config_reference():
        key, _, owner = full.partition("  ")
        section, _, field = key.rpartition(".")
        for name in {section} | ({f"{section}[{owner.strip('[]')}]"} if owner else set()):
            ref.setdefault(name, {}).setdefault(field, set()).add(default)
    for section in ("method", "objective"):
        ref[section]["name"] = {"(any registered name)"}
    return ref


REF = _reference()
PYTHON_ATTRIBUTES = {"model": tiny_llama(), "method": Method, "objective": Objective}


def _is_python_attribute(section: str, field: str, line: str) -> bool:
    """`model.generate`, `method.apply`, `data.rows_skipped` (a report.json field): not config keys."""
    if section == "data" and "report.json" in line:
        return field in {f.name for f in dataclasses.fields(DataReport)}
    owner = PYTHON_ATTRIBUTES.get(section)
    return owner is not None and hasattr(owner, field) and field not in REF.get(section, {})


def _normalise(value: str) -> object:
    """A default as written in the docs (`null`, `2e-4`, `[q_proj, v_proj]`, `'auto'`) or by config-help (its
    repr) as a comparable Python value."""
    text = value.strip().strip("`").strip()
    if text in ("(required)", "required"):
        return "(required)"
    for parse in (ast.literal_eval, yaml.safe_load):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError, yaml.YAMLError):
            continue
        if isinstance(parsed, str):
            try:
                return float(parsed)
            except ValueError:
                return parsed
        return float(parsed) if isinstance(parsed, int) and not isinstance(parsed, bool) else parsed
    return text


def _same_default(quoted: str, defaults: set[str]) -> bool:
    """Whether the docs' ``quoted`` default is one of config-help's ``defaults``."""
    return any(_normalise(quoted) == _normalise(d) for d in defaults)


# --- where the docs name keys ----------------------------------------------------------------------------

DOTTED = re.compile(r"`((?:evals\[\]|[a-z_]+)\.[a-z_]+)(?:\s*(?:=|:)\s*([^`]*))?`")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
OVERRIDE = re.compile(r"(?<![\w.])((?:model|data|train|method|objective)\.[a-z_]+)=")


def dotted_keys() -> list[tuple[str, str, str, str]]:
    """(where, section, field, the line) for every backticked dotted run-config key outside code blocks."""
    found = []
    for page in PAGES:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text(encoding="utf-8"))
        for number, line in enumerate(text.splitlines(), 1):
            for m in DOTTED.finditer(line):
                section, _, field = m.group(1).partition(".")
                if section.rstrip("[]") not in {s.rstrip("[]") for s in SECTIONS} or field in FILE_SUFFIXES:
                    continue
                section = "evals[]" if section.startswith("evals") else section
                if not _is_python_attribute(section, field, line):
                    found.append((f"{page.name}:{number}", section, field, line))
    return found


def yaml_blocks() -> list[tuple[str, dict]]:
    """(where, parsed block) for every ```yaml block of a run config (its top-level keys are run-config keys)."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) == "yaml":
                blocks.append((f"{page.name}:{text[:m.start()].count(chr(10)) + 1}", yaml.safe_load(m.group(2))))
    return blocks


def override_keys() -> list[tuple[str, str, str]]:
    """(where, section, field) for every `key=value` of an `lmadapt train` command in a code block."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            for line in m.group(2).splitlines():
                if line.lstrip().startswith("lmadapt train"):
                    for key in OVERRIDE.findall(line):
                        section, _, field = key.partition(".")
                        found.append((f"{page.name}: {line.strip()}", section, field))
    return found


def key_tables() -> list[tuple[str, str | None, list[tuple[list[str], str | None]]]]:
    """(where, section named in the header or None, [(keys of a row, its default cell or None)]) for every table
    whose header is ``| key | ... default ...`` or ``| setting (`SECTION:`) | ...``."""
    tables = []
    for page in PAGES:
        if page.name in OTHER_CONFIG_PAGES:
            continue
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            named = re.fullmatch(r"setting \(`(\w+):`\)", cells[0])
            if not (cells[0] == "key" and "default" in cells) and not named:
                continue
            column = cells.index("default") if "default" in cells else None
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                parts = [c.strip() for c in row.strip().strip("|").split("|")]
                rows.append((re.findall(r"`([a-z_]+)`", parts[0]), None if column is None else parts[column]))
            section = named.group(1) if named else None
            if page.parent.name == "methods":  # docs/methods/<name>.md: its tables are that method's keys
                section = f"method[{page.stem}]"
            tables.append((f"{page.name}:{i + 1}", section, rows))
    return tables


def inline_defaults() -> list[tuple[str, str, str, str]]:
    """(where, section, field, quoted default) from "`K` (default V)", "`K: V` (default)", "`K` is `V` (default)"
    and "`K`'s default, `V`" (K dotted, or bare on a page of one section)."""
    patterns = [re.compile(r"`(?P<key>[\w.\[\]]+)` \(default (?P<value>`[^`]+`|[^)\s,;]+)\)"),
                re.compile(r"`(?P<key>[\w.\[\]]+)(?::|=) ?(?P<value>[^`]+)` \(default\)"),
                re.compile(r"`(?P<key>[\w.\[\]]+)` is (?P<value>`[^`]+`) \(default\)"),
                re.compile(r"`(?P<key>[\w.\[\]]+)`'s default,? (?:is )?(?P<value>`[^`]+`)")]
    found = []
    for page in PAGES:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text(encoding="utf-8"))
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in patterns:
                for m in pattern.finditer(line):
                    section, _, field = m.group("key").rpartition(".")
                    section = section or PAGE_SECTION.get(page.name, "")
                    if section in REF and field in REF[section]:
                        found.append((f"{page.name}:{number}", section, field, m.group("value")))
                    elif section in REF:
                        found.append((f"{page.name}:{number}", section, field, "(unknown key)"))
    return found


# --- the checks --------------------------------------------------------------------------------------------

def test_every_dotted_key_in_the_docs_is_a_config_key():
    found = dotted_keys()
    assert len(found) > 50  # the scan itself works: the docs name many keys
    unknown = [f"{where}: {section}.{field}" for where, section, field, _ in found if field not in REF[section]]
    assert not unknown, "keys the docs name that config-help does not list:\n" + "\n".join(unknown)


def test_every_yaml_block_and_override_uses_config_keys_and_validates():
    blocks = yaml_blocks()
    assert len(blocks) >= 3
    problems = []
    for where, block in blocks:
        run_like = {k: v for k, v in block.items() if k in REF[""] or k in SECTIONS or k == "evals"}
        if set(run_like) != set(block):
            problems.append(f"{where}: not a run config: {sorted(set(block) - set(run_like))}")
            continue
        config = {"data": {"train": ["x.jsonl"]}, **block}  # a fragment (one section) still validates
        try:
            load_run_config(config)
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its block
            problems.append(f"{where}: {exc}")
    for where, section, field in override_keys():
        if field not in REF[section]:
            problems.append(f"{where}: {section}.{field}")
    assert not problems, "\n".join(problems)


def test_every_key_table_names_existing_keys_with_their_defaults():
    tables = key_tables()
    assert len(tables) >= 4
    problems = []
    for where, named, rows in tables:
        keys = [k for row_keys, _ in rows for k in row_keys]
        section = named if named is not None else max(
            (s for s in REF if "[" not in s or s == "evals[]"), key=lambda s: sum(k in REF[s] for k in keys))
        for row_keys, default in rows:
            problems += [f"{where}: {section}.{k} is not a config key" for k in row_keys if k not in REF[section]]
            if default is None or not row_keys or any(k not in REF[section] for k in row_keys):
                continue
            quoted = re.split(r",\s*", default) if len(row_keys) > 1 else [default]
            if len(quoted) != len(row_keys):
                continue  # one default written for several keys: not a quote of each
            for key, value in zip(row_keys, quoted):
                if not _same_default(value, REF[section][key]):
                    problems.append(f"{where}: {section}.{key} default {value} in the docs, {REF[section][key]} "
                                    f"in the code")
    assert not problems, "\n".join(problems)


def test_every_default_quoted_in_a_sentence_matches_the_code():
    found = inline_defaults()
    assert len(found) >= 5
    problems = [f"{where}: {section}.{field}: {value}" for where, section, field, value in found
                if value == "(unknown key)"]
    problems += [f"{where}: {section}.{field} default {value} in the docs, {REF[section][field]} in the code"
                 for where, section, field, value in found
                 if value != "(unknown key)" and not _same_default(value, REF[section][field])]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("quote, default", [("`null`", "None"), ("2e-4", "0.0002"), ("`auto`", "'auto'"),
                                            ("`[]`", "[]"), ("required", "(required)"), ("`16`", "16")])
def test_quoted_defaults_are_compared_as_values(quote, default):
    assert _normalise(quote) == _normalise(default)
    assert _normalise("`fp32`") != _normalise("'auto'")


# A measured figure: a number or range followed by x, %, or a unit of time, memory or speed.
FIGURE = re.compile(r"\d+(?:\.\d+)?(?:\s*[–-]\s*\d+(?:\.\d+)?)?\s*(?:x\b|%|minutes\b|min\b|s\b|MB\b|GB\b|tok(?:ens)?/s)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
LINK = re.compile(r"\b(docs/[\w.]+\.md)\b")


def test_every_figure_on_a_readme_line_is_on_the_page_it_links():
    """A README line with measured figures (1.31x, 93.6%, 7–9 minutes) links a docs page, and each number is
    written on that page (docs/benchmarks.md for speed, docs/demo.md for the demo)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")  # code blocks too: the commands' comments quote figures
    problems, checked = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        pages = LINK.findall(line)
        line = re.sub(r"`[^`]*`", "", line)  # code (versions, commands) is not a measured figure
        figures = [n for m in FIGURE.finditer(line) for n in NUMBER.findall(m.group(0))]
        if not figures:
            continue
        if not pages:
            problems.append(f"README.md:{number}: figures {figures} but no docs page backs them")
            continue
        backing = " ".join((ROOT / p).read_text(encoding="utf-8") for p in set(pages))
        for figure in figures:
            checked += 1
            if not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", backing):
                problems.append(f"README.md:{number}: {figure} is not in {', '.join(sorted(set(pages)))}")
    assert checked >= 4
    assert not problems, "\n".join(problems)


def test_configuration_md_lists_every_top_level_key_of_a_run_config():
    """The table of sections in configuration.md names every top-level key (``init_adapter`` was missing)."""
    from lmadapt.recipes.finetune import RunConfig

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text[text.index("| section |"):].split("\n\n")[0]
    named = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+):?`", row.split("|")[1])}
    assert named == {f.name for f in dataclasses.fields(RunConfig)}


def test_the_validation_example_in_configuration_md_is_what_lmadapt_prints(tmp_path, monkeypatch, capsys):
    """The example error of configuration.md's "Validation" section, for the config it describes."""
    from lmadapt.cli import main

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = FENCE.search(text, text.index("## Validation")).group(2)
    (tmp_path / "run.yaml").write_text("trian: {}\ndata: {train: [x.jsonl]}\nmethod: {name: lora, r: zero}\n"
                                       "train: {precision: bf61}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "run.yaml"]) == 2
    printed = capsys.readouterr().err
    assert sorted(example.strip().splitlines()) == sorted(printed.strip().splitlines())


# *.meta.yaml: the provenance record beside a data file that `lmadapt recovery-data` wrote, not a config
RUN_EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                      if p.name not in {"helper_model.yaml", "vas.yaml"} and not p.name.endswith(".meta.yaml"))


@pytest.mark.parametrize("example", RUN_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_every_example_run_config_validates(example, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their data relative to the checkout, as the README runs them
    cfg = load_run_config(str(example.relative_to(ROOT)))
    assert cfg.output_dir


def test_every_method_beyond_the_core_three_has_a_page_an_example_and_a_row_in_methods_md():
    from lmadapt.methods import available_methods

    index = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    missing = []
    for name in available_methods():
        if name in {"lora", "full", "freeze"}:  # documented on docs/methods.md itself
            continue
        missing += [f"docs/methods/{name}.md"] * (not (ROOT / "docs" / "methods" / f"{name}.md").is_file())
        missing += [f"examples/methods/{name}.yaml"] * (not (ROOT / "examples" / "methods" / f"{name}.yaml").is_file())
        missing += [f"a link to methods/{name}.md in docs/methods.md"] * (f"(methods/{name}.md)" not in index)
    assert not missing, "\n".join(missing)
