"""The task registry: an evaluation task is one file that builds an :class:`EvalTask` and registers it by name.

A task says which fields a row needs (and how to check each), which :class:`EvalConfig` settings it reads,
and how it runs. Nothing else in lmadapt lists the tasks: ``EvalConfig.task`` is checked here, ``lmadapt
eval --task`` takes its choices from here, and :mod:`lmadapt.evaluation.tasks` imports every module in
its folder, so adding a task means adding one file there::

    def _run(model, tokenizer, rows, cfg, progress):   # rows: dicts with the task's canonical fields
        ...                                              # -> (metrics, one prediction row per input row)
        return {"accuracy": ...}, [{"prediction": ..., "gold": ..., "score": ..., "correct": ...}, ...]

    register_task(EvalTask(name="my_task", fields={"prompt": string_problem}, reads=("chat",), run=_run))

A task that sets ``completion`` also reads files in lmadapt's training formats (prompt/completion,
instruction, chat ``messages``): the prompt fills ``prompt`` and the completion (the last assistant turn)
fills the field ``completion`` names (:mod:`lmadapt.evaluation.formats`). A task whose settings depend on
every row of the files, not only the evaluated ones, sets ``settle`` (classification: its candidate labels).

This module stays light (no torch, no transformers): the command line builds its parser from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmadapt.config import ConfigError, did_you_mean

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


# cfg below is an lmadapt.evaluation.config.EvalConfig (which imports this module, so it is not named here)
FieldCheck = Callable[[Any, Mapping[str, Any], "Any"], "str | None"]
"""``check(value, row, cfg)``: what is wrong with a present (non-null) field value, or None (``value`` is None only
for a field the task lists as ``optional``). ``row`` holds the task's canonical fields (to check one field against
another); ``cfg`` is None for rows given in memory."""

TaskRun = Callable[["nn.Module", "PreTrainedTokenizerBase", list[dict[str, Any]], "Any", "bool | None"],
                   tuple[dict[str, Any], list[dict[str, Any]]]]
"""``run(model, tokenizer, rows, cfg, progress) -> (metrics, predictions)``: one prediction per row, in order,
each with ``prediction``, ``gold``, ``score`` and ``correct`` (and anything else worth keeping)."""

COMMON_SETTINGS = ("task", "data", "max_examples")  # read for every task; so is <field>_field for its fields
# read by every task that takes training-format files (one that sets EvalTask.completion)
TRAINING_FORMAT_SETTINGS = ("prompt_field", "completion_field", "instruction_field", "input_field", "output_field",
                            "messages_field", "chat", "system_prompt")

Settle = Callable[["Any", list[dict[str, Any]]], "Any"]
"""``settle(cfg, values) -> cfg``: the config with the settings that depend on the whole data filled in, from
``values``, the task's fields of every row of the files that could be read (not only the evaluated ones)."""


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: the fields of a row, the settings it reads, and the function that runs it."""

    name: str
    fields: Mapping[str, FieldCheck]  # canonical field name -> check of its value, in the order docs list them
    run: TaskRun = field(repr=False)
    reads: tuple[str, ...] = ()  # EvalConfig settings it reads besides COMMON_SETTINGS and the field names
    summary: str = ""  # one line: what the task measures
    completion: str | None = None  # the field a training-format row's completion fills (None: no such rows)
    settle: Settle | None = field(default=None, repr=False)  # fills settings that depend on every row
    optional: tuple[str, ...] = ()  # fields a row may leave out or null; their check then gets None (and may object)

    def row_problems(self, row: Mapping[str, Any], cfg: Any = None) -> list[tuple[str, str]]:
        """``(field, problem)`` for every missing or malformed field of one row (canonical field names)."""
        problems = []
        for key, check in self.fields.items():
            value = row.get(key)
            problem = "missing" if value is None and key not in self.optional else check(value, row, cfg)
            if problem:
                problems.append((key, problem))
        return problems

    def settings(self) -> set[str]:
        """Every EvalConfig setting this task reads: the common ones, its own, its fields' names, and those of
        the training formats when it reads them."""
        training = TRAINING_FORMAT_SETTINGS if self.completion else ()
        return {*COMMON_SETTINGS, *self.reads, *(f"{key}_field" for key in self.fields), *training}


TASKS: dict[str, EvalTask] = {}
"""The registered tasks by name. Use :func:`register_task`, :func:`get_task` and :func:`available_tasks`."""


def register_task(task: EvalTask) -> EvalTask:
    """Make ``task`` available by its name; raises TypeError for a nameless, fieldless or duplicate task, or a
    ``completion`` or an ``optional`` that is not one of its fields. (A setting in ``reads`` that EvalConfig does
    not have is reported when a config names the task.)"""
    if not task.name or not task.fields:
        raise TypeError(f"an evaluation task needs a name and at least one field, got {task!r}")
    if task.completion is not None and (task.completion not in task.fields or "prompt" not in task.fields):
        raise TypeError(f"task {task.name!r}: completion={task.completion!r} must name one of its fields, and a "
                        f"task that reads training formats needs a 'prompt' field")
    if set(task.optional) - set(task.fields):
        raise TypeError(f"task {task.name!r}: optional={task.optional!r} must name some of its fields")
    if task.name in TASKS and TASKS[task.name] is not task:
        raise TypeError(f"an evaluation task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def _load_builtin_tasks() -> None:
    importlib.import_module("lmadapt.evaluation.tasks")  # each module registers its task on import


def available_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    _load_builtin_tasks()
    return sorted(TASKS)


def unknown_task_problem(name: Any) -> str | None:
    """``"task: 'x' is not one of ... Did you mean ...?"`` for a name that is not registered, else None."""
    names = available_tasks()
    if name in names:
        return None
    return (f"task: {name!r} is not one of {', '.join(repr(n) for n in names)}."
            f"{did_you_mean(str(name), names)}")


def get_task(name: str) -> EvalTask:
    """The task registered as ``name``; a ConfigError with "did you mean" for unknown names."""
    problem = unknown_task_problem(name)
    if problem:
        raise ConfigError([problem])
    return TASKS[name]


class TaskNames(Sequence[str]):
    """The registered task names, looked up only when first used.

    As argparse ``choices`` (with a ``metavar``) this keeps building the command-line parser free of the
    tasks' imports (torch, transformers): they load when a task name is checked or the help is shown.
    """

    def __getitem__(self, index: Any) -> Any:
        return available_tasks()[index]

    def __len__(self) -> int:
        return len(available_tasks())

    def __contains__(self, name: object) -> bool:
        return name in available_tasks()
