"""Evaluation examples: read from files and checked row by row, each problem naming file, line and field.

Rows hold the task's own fields, or are in a training format (:mod:`lmadapt.evaluation.formats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmadapt.data.formats import ROLES
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.formats import training_format, training_row
from lmadapt.evaluation.registry import EvalTask, get_task
from lmadapt.progress import track

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One evaluation row: a stable ``id``, where it was read (``file:line``) and the task's fields."""

    id: Any  # the row's "id" field if it has one (not null or ""), else ``source``
    source: str  # as lmadapt.data.readers names rows: path:LINE (JSONL, CSV), path:item N (JSON), path:row N
    data: dict[str, Any]  # the task's canonical fields (text, prompt, answer, choices, label, ...)


def candidate_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], what: str) -> list[list[int]]:
    """Each candidate tokenized on its own, as written, without special tokens."""
    ids = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    empty = [repr(t) for t, i in zip(texts, ids) if not i]
    if empty:
        raise LmadaptError(f"{what} {', '.join(empty)} tokenize(s) to no tokens; give non-empty strings")
    return ids


def string_problem(value: Any, row: Mapping[str, Any] | None = None, cfg: EvalConfig | None = None) -> str | None:
    """A field check (see :data:`~lmadapt.evaluation.registry.FieldCheck`): the value must be a string."""
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r:.60}"


def prompt_problem(value: Any, row: Mapping[str, Any] | None = None, cfg: EvalConfig | None = None) -> str | None:
    """A field check: a prompt is a string, or a conversation (a list of ``{"role", "content"}`` turns)."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(t, dict) and t.get("role") in ROLES
                                       and isinstance(t.get("content"), str) for t in value):
        return None
    return (f"expected a string or a list of {{role, content}} turns (roles: {', '.join(ROLES)}), got "
            f"{type(value).__name__} {value!r:.60}")


def check_examples(task: str, examples: list[dict[str, Any]]) -> None:
    """Raise :class:`DataError` listing every malformed in-memory example (by index and field)."""
    spec = get_task(task)
    problems = [f"example {i}: field '{key}': {p}" for i, ex in enumerate(examples) for key, p in spec.row_problems(ex)]
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    if not examples:
        raise LmadaptError(f"{task}: no examples to evaluate")


def shorten(text: str | Sequence[Mapping[str, Any]], limit: int = 200) -> str:
    """``text``, or its last ``limit`` characters after '...' (the end of a prompt is what matters); a
    conversation is shown as ``role: content`` lines."""
    if not isinstance(text, str):
        text = "\n".join(f"{turn.get('role')}: {turn.get('content')}" for turn in text)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def progress_bar(items: Sequence[Any], desc: str, progress: bool | None, unit: str = "examples",
                 size: Callable[[Any], int] | None = None) -> Any:
    """``items``, counted on stderr as ``eval <desc>`` as :mod:`lmadapt.progress` shows it (``progress=False``:
    silently); each item counts ``size(item)`` units (default 1)."""
    return track(items, f"eval {desc}", unit, progress, size=size)


@dataclass(frozen=True)
class EvalData:
    """What the files of one evaluation hold."""

    examples: list[Example]  # the evaluated rows: the first max_examples, checked
    values: list[dict[str, Any]]  # the task's fields of every row that could be read, evaluated or not


def load_examples(cfg: EvalConfig) -> list[Example]:
    """The examples of ``cfg.data`` with the task's canonical field names, each with its id and source.

    Raises :class:`DataError` naming ``file:line`` and the field for every malformed row (of the first
    ``max_examples`` rows), every row :func:`lmadapt.data.read_records` could not read, and every id used twice.
    """
    return read_eval_data(cfg).examples


def read_eval_data(cfg: EvalConfig) -> EvalData:
    """:func:`load_examples`, with the fields of every row of the files (see :class:`EvalData`)."""
    from lmadapt.data import (
        read_records,  # lazily: only evaluation from files needs the data module
    )

    task = get_task(cfg.task)
    records, read_problems = read_records(cfg.data, text_field=cfg.text_field)  # text_field: for .txt files
    fmt = training_format(records, cfg, task)
    evaluated = len(records) if cfg.max_examples is None else cfg.max_examples
    problems = list(read_problems)
    examples, values, seen = [], [], {}
    for n, record in enumerate(records):
        data, found = _row(record, fmt, cfg, task)
        if data is not None and not found:
            values.append(data)
        if n >= evaluated:
            continue
        problems += found
        example_id = record.data.get("id")
        example_id = record.source if example_id is None or example_id == "" else example_id
        id_problem = _id_problem(example_id, seen)
        if id_problem:
            problems.append(f"{record.source}: field 'id': {id_problem}")
        if _is_id(example_id):
            seen.setdefault(example_id, record.source)
        examples.append(Example(example_id, record.source, data or {}))
    if problems:
        raise DataError(problems, hint=_hint(task, fmt))
    if not examples:
        raise LmadaptError(f"eval: no examples in {', '.join(cfg.data)}")
    return EvalData(examples, values)


def _row(record: Any, fmt: str | None, cfg: EvalConfig, task: EvalTask) -> tuple[dict[str, Any] | None, list[str]]:
    """(the task's fields of one row, or None; the row's problems)."""
    if fmt is not None:
        return training_row(record, fmt, cfg, task)
    data = {key: record.data.get(cfg.field_name(key)) for key in task.fields}
    return data, [f"{record.source}: field '{cfg.field_name(key)}': {p}" for key, p in task.row_problems(data, cfg)]


def _hint(task: EvalTask, fmt: str | None) -> str:
    hint = "Fix these rows of the evaluation data."
    if task.completion is not None and fmt is None:
        fields = ", ".join(f"'{key}'" for key in task.fields)
        hint += (f" Rows of task {task.name!r} hold {fields}, or are training rows (prompt/completion, "
                 f"instruction/output or chat messages, the first row deciding which).")
    return hint


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _id_problem(value: Any, seen: dict[Any, str]) -> str | None:
    """Ids name rows in the predictions file: strings or integers, each used once."""
    if not _is_id(value):
        return f"expected a string or an integer, got {value!r:.60}"
    if value in seen:
        return f"{value!r:.60} is also the id of {seen[value]}; give every row its own id"
    return None
