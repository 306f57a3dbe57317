"""Evaluation examples: read from files and checked row by row, each problem naming file, line and field."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig, Task


def candidate_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], what: str) -> list[list[int]]:
    """Each candidate tokenized on its own, as written, without special tokens."""
    ids = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    empty = [repr(t) for t, i in zip(texts, ids) if not i]
    if empty:
        raise LmadaptError(f"{what} {', '.join(empty)} tokenize(s) to no tokens; give non-empty strings")
    return ids


_FIELDS = {"perplexity": ("text",), "generation": ("prompt", "answer"),
           "multiple_choice": ("prompt", "choices", "answer"), "classification": ("prompt", "label")}


def _field_problems(task: str, row: dict[str, Any], names: dict[str, str]) -> list[str]:
    """What is wrong with one example; each problem names the field as it is spelled in the data."""
    problems = []
    for key in _FIELDS[task]:
        name = names.get(key, key)
        value = row.get(name)
        if value is None:
            problem = "missing"
        elif key in ("text", "prompt", "label"):
            problem = None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r:.60}"
        elif key == "choices":
            ok = isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) and c for c in value)
            problem = None if ok else f"expected a list of at least 2 non-empty strings, got {value!r:.80}"
        else:
            problem = _answer_problem(task, value, row.get(names.get("choices", "choices")))
        if problem:
            problems.append(f"field '{name}': {problem}")
    return problems


def _answer_problem(task: str, value: Any, choices: Any) -> str | None:
    if task == "generation":
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
            return None
        return f"expected a string or a list of accepted strings, got {value!r:.60}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"expected a choice index (0-based) or a choice's text, got {value!r:.60}"
    if isinstance(choices, list) and isinstance(value, int) and not 0 <= value < len(choices):
        return f"index {value} is out of range for {len(choices)} choices"
    if isinstance(choices, list) and isinstance(value, str) and value not in choices:
        return f"{value!r:.60} is not one of the choices"
    return None


def check_examples(task: Task, examples: list[dict[str, Any]]) -> None:
    """Raise :class:`DataError` listing every malformed in-memory example (by index and field)."""
    problems = [f"example {i}: {p}" for i, ex in enumerate(examples) for p in _field_problems(task, ex, {})]
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    if not examples:
        raise LmadaptError(f"{task}: no examples to evaluate")


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]  # the end of a prompt is what matters


def load_examples(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The examples of ``cfg.data`` with canonical keys (text, prompt, answer, choices, label).

    Raises :class:`DataError` naming ``file:line`` and the field for every malformed row (of the first
    ``max_examples`` rows) and every row :func:`lmadapt.data.read_records` could not read.
    """
    from lmadapt.data import (
        read_records,  # lazily: only evaluation from files needs the data module
    )

    records, problems = read_records(cfg.data, text_field=cfg.text_field)  # text_field: for .txt files
    records = records[:cfg.max_examples] if cfg.max_examples is not None else records
    names = {"text": cfg.text_field, "prompt": cfg.prompt_field, "answer": cfg.answer_field,
             "choices": cfg.choices_field, "label": cfg.label_field}
    problems = list(problems)
    examples = []
    for record in records:
        found = _field_problems(cfg.task, record.data, names)
        if cfg.task == "classification" and cfg.labels and not found:
            label = record.data[cfg.label_field]
            if label not in cfg.labels and label.strip() not in {l.strip() for l in cfg.labels}:
                found.append(f"field '{cfg.label_field}': {label!r} is not one of the labels {cfg.labels}")
        problems += [f"{record.source}: {p}" for p in found]
        examples.append({key: record.data.get(name) for key, name in names.items() if key in _FIELDS[cfg.task]})
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    if not examples:
        raise LmadaptError(f"eval: no examples in {', '.join(cfg.data)}")
    return examples
