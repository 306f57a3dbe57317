"""The ``multiple_choice`` task: pick the choice with the highest log-likelihood after the prompt.

Scoring as in :mod:`lmadapt.evaluation.ranking`; two accuracies, by the summed and by the per-token mean
log-likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.scoring import Strategy
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import (
    candidate_ids,
    check_examples,
    progress_bar,
    prompt_problem,
    shorten,
)
from lmadapt.evaluation.ranking import argmax, log_likelihoods
from lmadapt.evaluation.registry import EvalTask, register_task


def multiple_choice_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                                examples: list[dict[str, Any]], *, chat: bool = False,
                                system_prompt: str | None = None, strategy: Strategy = "auto",
                                progress: bool | None = None) -> list[dict[str, Any]]:
    """One row per question: ``prediction`` and ``gold`` (choice indices), ``score`` (the chosen choice's
    summed log-likelihood), ``gold_score``, ``correct``, every choice's ``scores`` (summed) and
    ``scores_per_token`` (mean over its tokens), and the per-token ranking's ``prediction_per_token`` and
    ``correct_per_token``. All choices of one question are scored in one batch (see
    :func:`lmadapt.decoding.scoring.score_continuations`). ``answer`` is an index or the choice text.
    """
    check_examples("multiple_choice", examples)
    rows = []
    for ex in progress_bar(examples, "multiple_choice", progress):
        choices = candidate_ids(tokenizer, ex["choices"], "choices")
        sums, means = log_likelihoods(model, tokenizer, ex["prompt"], choices, chat=chat, system_prompt=system_prompt,
                                      strategy=strategy)
        gold = ex["answer"] if isinstance(ex["answer"], int) else ex["choices"].index(ex["answer"])
        best, best_mean = argmax(sums), argmax(means)
        rows.append({"prediction": best, "gold": gold, "score": sums[best], "correct": best == gold,
                     "gold_score": sums[gold], "scores": sums, "scores_per_token": means,
                     "prediction_per_token": best_mean, "correct_per_token": best_mean == gold})
    return rows


def multiple_choice_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
                             *, chat: bool = False, system_prompt: str | None = None, strategy: Strategy = "auto",
                             samples: int = 5, progress: bool | None = None) -> dict[str, Any]:
    """Pick the choice with the highest log-likelihood after the prompt; report two accuracies.

    ``accuracy`` ranks by the summed log-likelihood ``sum_t log p(c_t | x, c_<t)``, ``accuracy_per_token``
    by its mean over the choice's tokens (length-normalized per token; lm-evaluation-harness's
    ``acc_norm`` divides by the length in bytes instead). See :func:`multiple_choice_predictions`.
    """
    rows = multiple_choice_predictions(model, tokenizer, examples, chat=chat, system_prompt=system_prompt,
                                       strategy=strategy, progress=progress)
    return _metrics(examples, rows, samples)


def _metrics(examples: list[dict[str, Any]], rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    n = len(rows)
    shown = [{"prompt": shorten(ex["prompt"]), "choices": ex["choices"], "answer": row["gold"],
              "predicted": row["prediction"], "predicted_per_token": row["prediction_per_token"],
              "log_likelihoods": [round(s, 4) for s in row["scores"]]} for ex, row in zip(examples[:samples], rows)]
    return {"accuracy": sum(r["correct"] for r in rows) / n,
            "accuracy_per_token": sum(r["correct_per_token"] for r in rows) / n, "n": n, "samples": shown}


def _choices_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) and c for c in value):
        return None
    return f"expected a list of at least 2 non-empty strings, got {value!r:.80}"


def _answer_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    choices = row.get("choices")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"expected a choice index (0-based) or a choice's text, got {value!r:.60}"
    if isinstance(choices, list) and isinstance(value, int) and not 0 <= value < len(choices):
        return f"index {value} is out of range for {len(choices)} choices"
    if isinstance(choices, list) and isinstance(value, str) and value not in choices:
        return f"{value!r:.60} is not one of the choices"
    return None


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    predictions = multiple_choice_predictions(model, tokenizer, rows, chat=cfg.chat, system_prompt=cfg.system_prompt,
                                              progress=progress)
    return _metrics(rows, predictions, samples=5), predictions


TASK = register_task(EvalTask(
    name="multiple_choice",
    fields={"prompt": prompt_problem, "choices": _choices_problem, "answer": _answer_problem},
    reads=("chat", "system_prompt"), run=_run,
    summary="the choice with the highest log-likelihood after the prompt"))
