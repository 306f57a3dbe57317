"""The ``generation`` task: the share of prompts whose greedy generation matches an accepted answer.

Also reads training-format files (:mod:`lmadapt.evaluation.formats`): the completion is the answer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import generate
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import check_examples, prompt_problem, shorten
from lmadapt.evaluation.registry import EvalTask, register_task


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace.

    As in the official SQuAD v1.1 evaluation script (Rajpurkar et al., "SQuAD: 100,000+ Questions for
    Machine Comprehension of Text", arXiv:1606.05250).
    """
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_matches(prediction: str, answer: str, match: Literal["exact", "normalized"]) -> bool:
    """``exact``: equal after stripping surrounding whitespace; ``normalized``: equal after :func:`normalize_answer`."""
    if match == "exact":
        return prediction.strip() == answer.strip()
    return normalize_answer(prediction) == normalize_answer(answer)


def generation_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], *,
                           match: Literal["exact", "normalized"] = "normalized", max_new_tokens: int = 16,
                           chat: bool = False, system_prompt: str | None = None, batch_size: int = 8,
                           first_line: bool = True, progress: bool | None = None) -> list[dict[str, Any]]:
    """One row per example: the greedy ``prediction``, the ``gold`` answer(s), ``correct``; ``score`` is null.

    The prediction is the generated text, cut at its first line break when ``first_line`` (after
    leading whitespace: base models rarely stop by themselves). It is compared with :func:`answer_matches`;
    nothing else counts (an answer merely *contained* in the prediction is wrong).
    """
    if match not in ("exact", "normalized"):
        raise LmadaptError(f"generation_accuracy: match must be 'exact' or 'normalized', got {match!r}")
    check_examples("generation", examples)
    outputs = generate(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens=max_new_tokens,
                       chat=chat, system_prompt=system_prompt, batch_size=batch_size, progress=progress,
                       progress_desc="eval generation")
    rows = []
    for ex, out in zip(examples, outputs):
        prediction = out.lstrip().split("\n", 1)[0] if first_line else out
        answers = ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]]
        ok = any(answer_matches(prediction, a, match) for a in answers)
        rows.append({"prediction": prediction, "gold": ex["answer"], "score": None, "correct": ok})
    return rows


def generation_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], *,
                        match: Literal["exact", "normalized"] = "normalized", max_new_tokens: int = 16,
                        chat: bool = False, system_prompt: str | None = None, batch_size: int = 8,
                        first_line: bool = True, samples: int = 5,
                        progress: bool | None = None) -> dict[str, Any]:
    """Share of prompts whose greedy generation matches the ``answer`` (a string or a list of accepted ones).

    See :func:`generation_predictions`; ``samples`` examples are shown with their predictions.
    """
    rows = generation_predictions(model, tokenizer, examples, match=match, max_new_tokens=max_new_tokens, chat=chat,
                                  system_prompt=system_prompt, batch_size=batch_size, first_line=first_line,
                                  progress=progress)
    return _metrics(examples, rows, match, samples)


def _metrics(examples: list[dict[str, Any]], rows: list[dict[str, Any]], match: str, samples: int) -> dict[str, Any]:
    correct = sum(row["correct"] for row in rows)
    shown = [{"prompt": shorten(ex["prompt"]), "answer": ex["answer"], "prediction": row["prediction"],
              "correct": row["correct"]} for ex, row in zip(examples[:samples], rows)]
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples), "match": match,
            "samples": shown}


def _answer_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
        return None
    return f"expected a string or a list of accepted strings, got {value!r:.60}"


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    predictions = generation_predictions(model, tokenizer, rows, match=cfg.match, max_new_tokens=cfg.max_new_tokens,
                                         chat=cfg.chat, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size,
                                         progress=progress)
    return _metrics(rows, predictions, cfg.match, samples=5), predictions


TASK = register_task(EvalTask(
    name="generation", fields={"prompt": prompt_problem, "answer": _answer_problem},
    reads=("chat", "system_prompt", "match", "max_new_tokens", "batch_size"), run=_run,
    summary="greedy generation compared with the accepted answers", completion="answer"))
