"""The ``perplexity`` task: token-weighted perplexity of texts, ``exp(-(1/N) sum_t log p(x_t | x_<t))``."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import eval_mode
from lmadapt.decoding.scoring import right_pad
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import progress_bar, string_problem
from lmadapt.evaluation.registry import EvalTask, register_task
from lmadapt.models.tree import model_device


def text_nlls(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int = 1024,
              batch_size: int = 4, progress: bool | None = None) -> list[tuple[float, int]]:
    """``(sum_t -log p(x_t | x_<t), scored tokens)`` of each text, in order.

    Each text is tokenized as written (with the tokenizer's special tokens). A text longer than
    ``max_length`` is cut into windows of ``max_length`` tokens that overlap by one token, so every
    token after the first is predicted exactly once (from the context inside its window; a sliding
    window with a larger overlap would give more context, and a lower perplexity, at more cost).
    Windows of all texts are batched together, shortest first.
    """
    if max_length < 2:
        raise LmadaptError(f"perplexity: max_length must be >= 2, got {max_length}")
    # verbose=False: texts longer than the model's limit are expected here, they are split below
    windows = [(i, w) for i, text in enumerate(texts)
               for w in _windows(list(tokenizer(text, verbose=False).input_ids), max_length)]
    windows.sort(key=lambda item: len(item[1]))  # similar lengths share a batch
    sums, counts = [0.0] * len(texts), [0] * len(texts)
    device = model_device(model)
    with eval_mode(model):
        for start in progress_bar(range(0, len(windows), batch_size), "perplexity", progress, unit="batches"):
            batch = windows[start:start + batch_size]
            ids, mask = right_pad([w for _, w in batch], device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, (text, window) in enumerate(batch):  # row by row: one float32 copy of the logits at a time
                n = len(window) - 1
                sums[text] += F.cross_entropy(logits[row, :n].float(), ids[row, 1:n + 1], reduction="sum").item()
                counts[text] += n
    return list(zip(sums, counts))


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    step = max_length - 1
    return [ids[s:s + max_length] for s in range(0, max(len(ids) - 1, 0), step)]


def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int = 1024,
               batch_size: int = 4, progress: bool | None = None) -> dict[str, float | int]:
    """Token-weighted perplexity over all texts: ``exp(-(1/N) sum_t log p(x_t | x_<t))`` (see :func:`text_nlls`)."""
    return _metrics(text_nlls(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                              progress=progress))


def _metrics(nlls: list[tuple[float, int]]) -> dict[str, float | int]:
    nll, count = sum(s for s, _ in nlls), sum(n for _, n in nlls)
    if count == 0:
        raise LmadaptError("perplexity: no tokens to score (every text is empty or a single token)")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics, and per text its mean NLL (``score``; null for a text with no scored token) and ``tokens``."""
    nlls = text_nlls(model, tokenizer, [row["text"] for row in rows], max_length=cfg.max_length,
                     batch_size=cfg.batch_size, progress=progress)
    predictions = [{"prediction": None, "gold": None, "score": s / n if n else None, "correct": None, "tokens": n}
                   for s, n in nlls]
    return _metrics(nlls), predictions


TASK = register_task(EvalTask(
    name="perplexity", fields={"text": string_problem}, reads=("max_length", "batch_size"), run=_run,
    summary="token-weighted perplexity of texts"))
