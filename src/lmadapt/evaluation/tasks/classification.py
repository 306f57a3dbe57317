"""The ``classification`` task: the label whose text is the likeliest continuation, ``argmax_l log p(l | x)``.

Scoring as in :mod:`lmadapt.evaluation.ranking` (complete multi-token labels, summed). Without ``labels``,
the candidates are the labels of every row of the files, evaluated or not (so ``max_examples`` cannot
leave a single candidate). Also reads training-format files: the completion is the label.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.scoring import Strategy
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import (
    candidate_ids,
    check_examples,
    progress_bar,
    prompt_problem,
    shorten,
    string_problem,
)
from lmadapt.evaluation.ranking import argmax, log_likelihoods
from lmadapt.evaluation.registry import EvalTask, register_task


def classification_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                               examples: list[dict[str, Any]], labels: list[str], *, chat: bool = False,
                               system_prompt: str | None = None, strategy: Strategy = "auto",
                               progress: bool | None = None) -> list[dict[str, Any]]:
    """One row per example: ``prediction`` and ``gold`` (labels as spelled in ``labels``), ``score`` (the
    predicted label's log-likelihood), ``gold_score``, ``correct`` and every label's ``scores``.

    The prompt runs once per example and every label is scored from its KV cache. An example's ``label``
    must be one of ``labels``, exactly or after stripping surrounding whitespace.
    """
    check_examples("classification", examples)
    gold = _gold_labels(examples, labels)
    if len(labels) < 2:
        warnings.warn(f"classification: only {len(labels)} candidate label ({labels[0]!r}), so every example is "
                      f"predicted as it and the accuracy measures nothing. Give the candidates in labels "
                      f"(--labels on the command line), or evaluate data that holds several labels.", stacklevel=2)
    label_ids = candidate_ids(tokenizer, labels, "labels")
    _warn_on_prefix_labels(labels, label_ids)
    rows = []
    for ex, g in zip(progress_bar(examples, "classification", progress), gold):
        sums, _ = log_likelihoods(model, tokenizer, ex["prompt"], label_ids, chat=chat, system_prompt=system_prompt,
                                  strategy=strategy)
        predicted = labels[argmax(sums)]
        scores = dict(zip(labels, sums))
        rows.append({"prediction": predicted, "gold": g, "score": scores[predicted], "correct": predicted == g,
                     "gold_score": scores[g], "scores": scores})
    return rows


def classification_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
                            labels: list[str], *, chat: bool = False, system_prompt: str | None = None,
                            strategy: Strategy = "auto", samples: int = 5,
                            progress: bool | None = None) -> dict[str, Any]:
    """Classify each prompt by the label whose text is the likeliest continuation, ``argmax_l log p(l | x)``.

    Returns accuracy, per-class accuracy (recall) and confusion counts ``confusion[gold][predicted]``
    (see :func:`classification_predictions`).
    """
    rows = classification_predictions(model, tokenizer, examples, labels, chat=chat, system_prompt=system_prompt,
                                      strategy=strategy, progress=progress)
    return _metrics(examples, rows, labels, samples)


def _metrics(examples: list[dict[str, Any]], rows: list[dict[str, Any]], labels: list[str],
             samples: int) -> dict[str, Any]:
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for row in rows:
        confusion[row["gold"]][row["prediction"]] += 1
    correct = sum(row["correct"] for row in rows)
    support = {l: sum(confusion[l].values()) for l in labels}
    per_class = {l: confusion[l][l] / support[l] for l in labels if support[l]}
    shown = [{"prompt": shorten(ex["prompt"]), "label": row["gold"], "predicted": row["prediction"],
              "log_likelihoods": {l: round(s, 4) for l, s in row["scores"].items()}}
             for ex, row in zip(examples[:samples], rows)]
    return {"accuracy": correct / len(rows), "correct": correct, "n": len(rows), "per_class_accuracy": per_class,
            "confusion": confusion, "labels": list(labels), "samples": shown}


def _gold_labels(examples: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Each example's label as spelled in ``labels`` (exact match first, then ignoring surrounding spaces)."""
    if not labels or len(set(labels)) != len(labels):
        raise LmadaptError(f"classification: labels must be non-empty and distinct, got {labels}")
    stripped = Counter(l.strip() for l in labels)
    by_stripped = {l.strip(): l for l in labels if stripped[l.strip()] == 1}
    out, problems = [], []
    for i, ex in enumerate(examples):
        label = ex["label"] if ex["label"] in labels else by_stripped.get(ex["label"].strip())
        if label is None:
            problems.append(f"example {i}: field 'label': {ex['label']!r} is not one of the labels {labels}")
        out.append(label)
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    return out


def _warn_on_prefix_labels(labels: list[str], label_ids: list[list[int]]) -> None:
    for a, ia in zip(labels, label_ids):
        for b, ib in zip(labels, label_ids):
            if a != b and ib[:len(ia)] == ia:
                warnings.warn(f"label {a!r} is a token-prefix of {b!r}, so its summed log-likelihood is always "
                              f"at least as high: {b!r} can never win. Rename the labels so that none is a "
                              f"token-prefix of another.", stacklevel=4)


def _label_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    """A string; from files, also one of ``cfg.labels`` when they are given (exactly or ignoring spaces)."""
    problem = string_problem(value)
    if problem or cfg is None or not cfg.labels:
        return problem
    if value not in cfg.labels and value.strip() not in {l.strip() for l in cfg.labels}:
        return f"{value!r} is not one of the labels {cfg.labels}"
    return None


def data_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The sorted set of the string labels in ``rows``."""
    return sorted({row["label"] for row in rows if isinstance(row.get("label"), str)})


def _settle(cfg: EvalConfig, values: list[dict[str, Any]]) -> EvalConfig:
    """Without ``labels``: the labels of every row of the files (not only the first max_examples)."""
    return cfg if cfg.labels else dataclasses.replace(cfg, labels=data_labels(values))


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    labels = list(cfg.labels) or data_labels(rows)
    predictions = classification_predictions(model, tokenizer, rows, labels, chat=cfg.chat,
                                             system_prompt=cfg.system_prompt, progress=progress)
    return _metrics(rows, predictions, labels, samples=5), predictions


TASK = register_task(EvalTask(
    name="classification", fields={"prompt": prompt_problem, "label": _label_problem},
    reads=("labels", "chat", "system_prompt"), run=_run,
    summary="the label whose text is the likeliest continuation of the prompt", completion="label",
    settle=_settle))
