"""Evaluation: a registry of tasks (one module each under :mod:`lmadapt.evaluation.tasks`), the examples they
read, per-example predictions and before/after reports.

:func:`evaluate` runs one :class:`EvalConfig`. Names are imported lazily, so that the command line can
read the registry without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "lmadapt.evaluation.config",
    "EvalTask": "lmadapt.evaluation.registry",
    "register_task": "lmadapt.evaluation.registry",
    "get_task": "lmadapt.evaluation.registry",
    "available_tasks": "lmadapt.evaluation.registry",
    "evaluate": "lmadapt.evaluation.run",
    "compare_table": "lmadapt.evaluation.report",
    "result_table": "lmadapt.evaluation.report",
    "read_predictions": "lmadapt.evaluation.predictions",
    "perplexity": "lmadapt.evaluation.tasks.perplexity",
    "generation_accuracy": "lmadapt.evaluation.tasks.generation",
    "multiple_choice_accuracy": "lmadapt.evaluation.tasks.multiple_choice",
    "classification_accuracy": "lmadapt.evaluation.tasks.classification",
    "completion_loss": "lmadapt.evaluation.tasks.completion_loss",
    "preference_accuracy": "lmadapt.evaluation.tasks.preference",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmadapt.evaluation' has no attribute {name!r}")
