"""Run one evaluation: read the examples of an :class:`EvalConfig`, run its registered task, keep the predictions.

Each task is a module of :mod:`lmadapt.evaluation.tasks` registered in :mod:`lmadapt.evaluation.registry`;
:func:`evaluate` reads the examples from files (one entry of a run config's ``evals:`` list, or the flags
of ``lmadapt eval``), runs the task, and can write one prediction per example to JSONL.
:func:`~lmadapt.evaluation.report.compare_table` shows base vs adapted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import eval_mode
from lmadapt.errors import ConfigError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import read_eval_data
from lmadapt.evaluation.predictions import write_predictions
from lmadapt.evaluation.registry import get_task


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, *,
             progress: bool | None = None, predictions: str | Path | None = None) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes; the result is a JSON-ready dict with ``task`` and the metrics.

    With ``predictions`` (a file path), also write one JSON line per evaluated example, in the order read:
    ``{"id", "prediction", "gold", "score", "correct", ...}`` (see docs/evaluation.md for each task's keys),
    through a temporary file and a rename, so the file is whole or absent. ``id`` is the row's ``id``
    field, or where it was read (``file:line``).

    The model is evaluated in eval mode under ``torch.inference_mode()``; its train/eval mode is
    restored afterwards. ``progress``: False shows nothing; True or None a bar on a terminal, else a status
    line on stderr every 30 s (:mod:`lmadapt.progress`).
    """
    problems = cfg.check()
    if problems:
        raise ConfigError(problems, "the evaluation config")
    task = get_task(cfg.task)
    data = read_eval_data(cfg)
    examples = data.examples
    if task.settle is not None:
        cfg = task.settle(cfg, data.values)
    with eval_mode(model):
        metrics, rows = task.run(model, tokenizer, [ex.data for ex in examples], cfg, progress)
    if len(rows) != len(examples):
        raise RuntimeError(f"task {cfg.task!r} returned {len(rows)} predictions for {len(examples)} examples")
    if predictions is not None:
        write_predictions(predictions, [{"id": ex.id, **row} for ex, row in zip(examples, rows)])
    return {"task": cfg.task, **metrics}
