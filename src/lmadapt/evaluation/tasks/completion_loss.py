"""The ``completion_loss`` task: held-out loss on the completions only, computed as training computes it.

Each row becomes token ids and labels by lmadapt.data's own tokenization
(:func:`lmadapt.data.tokenize_example` and :func:`lmadapt.data.fit_length`, with training's defaults
``add_eos: true``, ``loss_on_prompt: false``, ``truncation: right``): the prompt is masked, and the
completion with its EOS (or, for conversations, every assistant turn with its end-of-turn marker) carries
loss. So on a run's validation rows, read with the run's ``use_chat_template`` as ``chat``, the result
equals the run's validation loss::

    nll = -(1/N) sum_{t : label_t != -100} log p(x_t | x_<t),    perplexity = exp(nll)

over the N loss-bearing tokens of all rows together (token-weighted, like the validation loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.data import DataConfig, DataReport, fit_length, special_prefix, tokenize_example
from lmadapt.data import Example as TrainingExample
from lmadapt.data.tokens import IGNORE, RowProblem
from lmadapt.decoding.generation import eval_mode, prompt_messages
from lmadapt.decoding.scoring import right_pad
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import check_examples, progress_bar, prompt_problem
from lmadapt.evaluation.registry import EvalTask, register_task
from lmadapt.models.tree import model_device


def training_example(row: Mapping[str, Any], *, chat: bool = False, system_prompt: str | None = None,
                     source: str = "") -> TrainingExample:
    """The training example of a ``{prompt, completion}`` row, as lmadapt.data builds it: plain text
    segments (prompt untrained, completion trained), or with ``chat`` or a conversation prompt, the turns
    of :func:`~lmadapt.decoding.generation.prompt_messages` followed by the completion as an assistant turn."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and not chat:
        return TrainingExample(source, segments=((prompt, False), (completion, True)))
    turns = prompt_messages(prompt, system_prompt) + [{"role": "assistant", "content": completion}]
    return TrainingExample(source, messages=tuple(turns))


def tokenized_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *, chat: bool = False,
                   system_prompt: str | None = None, max_length: int = 1024) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each row as training tokenizes it; a row cut to nothing trainable by
    ``max_length`` gives empty lists (training drops it)."""
    examples = [training_example(row, chat=chat, system_prompt=system_prompt, source=f"example {i}")
                for i, row in enumerate(rows)]
    return tokenized_examples(tokenizer, examples, max_length=max_length)


def tokenized_examples(tokenizer: PreTrainedTokenizerBase, examples: list[TrainingExample], *,
                       max_length: int = 1024) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each training example (:class:`lmadapt.data.Example`) as training tokenizes it,
    with training's defaults; one cut to nothing trainable by ``max_length`` gives empty lists."""
    cfg, report, prefix = DataConfig(max_length=max_length), DataReport(), special_prefix(tokenizer)
    out, problems = [], []
    for example in examples:
        try:
            ids, labels = tokenize_example(example, tokenizer, cfg, prefix)
        except RowProblem as exc:
            problems.append(str(exc))
            continue
        pieces = fit_length(ids, labels, False, cfg, report)
        out.append(pieces[0] if pieces else ([], []))
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    return out


def completion_nlls(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *,
                    chat: bool = False, system_prompt: str | None = None, max_length: int = 1024,
                    batch_size: int = 4, progress: bool | None = None) -> list[tuple[float, int]]:
    """``(sum of -log p(x_t | x_<t) over the row's loss-bearing tokens, their count)`` of each row, in order.

    Rows are ``{"prompt", "completion"}`` (a prompt may be a conversation); see :func:`tokenized_rows`.
    Rows of similar length share a forward pass of ``batch_size``, right-padded.
    """
    check_examples("completion_loss", rows)
    tokens = tokenized_rows(tokenizer, rows, chat=chat, system_prompt=system_prompt, max_length=max_length)
    return token_nlls(model, tokens, batch_size=batch_size, progress=progress)


def token_nlls(model: nn.Module, tokens: list[tuple[list[int], list[int]]], *, batch_size: int = 4,
               progress: bool | None = None, desc: str = "completion_loss") -> list[tuple[float, int]]:
    """``(sum of -log p(x_t | x_<t) over the labelled tokens, their count)`` of each ``(input_ids, labels)`` row
    (labels as :func:`tokenized_examples` gives them; an empty row gives ``(0.0, 0)``), in order. Rows of similar
    length share a forward pass of ``batch_size``, right-padded; ``desc`` names the progress bar."""
    order = sorted((i for i in range(len(tokens)) if tokens[i][0]), key=lambda i: len(tokens[i][0]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    sums, counts = [0.0] * len(tokens), [0] * len(tokens)
    device = model_device(model)
    with eval_mode(model):
        for batch in progress_bar(batches, desc, progress, size=len):
            ids, mask = right_pad([tokens[i][0] for i in batch], device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, i in enumerate(batch):  # row by row: one float32 copy of the logits at a time
                n = len(tokens[i][0])
                targets = torch.tensor(tokens[i][1][1:], device=device)
                sums[i] = F.cross_entropy(logits[row, :n - 1].float(), targets, ignore_index=IGNORE,
                                          reduction="sum").item()
                counts[i] = int((targets != IGNORE).sum())
    return list(zip(sums, counts))


def completion_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *,
                    chat: bool = False, system_prompt: str | None = None, max_length: int = 1024,
                    batch_size: int = 4, progress: bool | None = None) -> dict[str, float | int]:
    """Mean NLL and perplexity over the completion tokens of ``rows`` (see the module docstring)."""
    return _metrics(completion_nlls(model, tokenizer, rows, chat=chat, system_prompt=system_prompt,
                                    max_length=max_length, batch_size=batch_size, progress=progress))


def _metrics(nlls: list[tuple[float, int]]) -> dict[str, float | int]:
    nll, count = sum(s for s, _ in nlls), sum(n for _, n in nlls)
    if count == 0:
        raise LmadaptError("completion_loss: no completion tokens to score (max_length cut every example to "
                           "its prompt); raise max_length")
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens": count}


def _completion_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__} {value!r:.60}"
    return None if value.strip() else "is empty (nothing to score)"


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics, and per row its mean NLL (``score``; null for a row with no scored token) and ``tokens``."""
    nlls = completion_nlls(model, tokenizer, rows, chat=cfg.chat, system_prompt=cfg.system_prompt,
                           max_length=cfg.max_length, batch_size=cfg.batch_size, progress=progress)
    predictions = [{"prediction": None, "gold": None, "score": s / n if n else None, "correct": None, "tokens": n}
                   for s, n in nlls]
    return _metrics(nlls), predictions


TASK = register_task(EvalTask(
    name="completion_loss", fields={"prompt": prompt_problem, "completion": _completion_problem},
    reads=("chat", "system_prompt", "max_length", "batch_size"), run=_run, completion="completion",
    summary="mean NLL and perplexity of the completions, the prompt masked as in training"))
