"""Evaluation examples: read from files and checked row by row, each problem naming file, line and field."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.registry import get_task

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


def check_examples(task: str, examples: list[dict[str, Any]]) -> None:
    """Raise :class:`DataError` listing every malformed in-memory example (by index and field)."""
    spec = get_task(task)
    problems = [f"example {i}: field '{key}': {p}" for i, ex in enumerate(examples) for key, p in spec.row_problems(ex)]
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    if not examples:
        raise LmadaptError(f"{task}: no examples to evaluate")


def shorten(text: str, limit: int = 200) -> str:
    """``text``, or its last ``limit`` characters after '...' (the end of a prompt is what matters)."""
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def progress_bar(items: Iterable[Any], desc: str, progress: bool | None) -> Any:
    """tqdm over ``items``; ``progress=None`` shows it only on a terminal."""
    return tqdm(items, desc=desc, leave=False, disable=None if progress is None else not progress)


def load_examples(cfg: EvalConfig) -> list[Example]:
    """The examples of ``cfg.data`` with the task's canonical field names, each with its id and source.

    Raises :class:`DataError` naming ``file:line`` and the field for every malformed row (of the first
    ``max_examples`` rows), every row :func:`lmadapt.data.read_records` could not read, and every id used twice.
    """
    from lmadapt.data import (
        read_records,  # lazily: only evaluation from files needs the data module
    )

    task = get_task(cfg.task)
    records, problems = read_records(cfg.data, text_field=cfg.text_field)  # text_field: for .txt files
    records = records[:cfg.max_examples] if cfg.max_examples is not None else records
    problems = list(problems)
    examples, seen = [], {}
    for record in records:
        data = {key: record.data.get(cfg.field_name(key)) for key in task.fields}
        problems += [f"{record.source}: field '{cfg.field_name(key)}': {p}" for key, p in task.row_problems(data, cfg)]
        example_id = record.data.get("id")
        example_id = record.source if example_id is None or example_id == "" else example_id
        id_problem = _id_problem(example_id, seen)
        if id_problem:
            problems.append(f"{record.source}: field 'id': {id_problem}")
        if _is_id(example_id):
            seen.setdefault(example_id, record.source)
        examples.append(Example(example_id, record.source, data))
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    if not examples:
        raise LmadaptError(f"eval: no examples in {', '.join(cfg.data)}")
    return examples


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _id_problem(value: Any, seen: dict[Any, str]) -> str | None:
    """Ids name rows in the predictions file: strings or integers, each used once."""
    if not _is_id(value):
        return f"expected a string or an integer, got {value!r:.60}"
    if value in seen:
        return f"{value!r:.60} is also the id of {seen[value]}; give every row its own id"
    return None
