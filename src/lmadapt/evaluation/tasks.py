"""The evaluation tasks: perplexity, generation accuracy, multiple choice and classification by log-likelihood."""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from typing import Any, Literal

import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import encode_prompt, eval_mode, generate
from lmadapt.decoding.scoring import Strategy, right_pad, score_continuations
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.examples import candidate_ids, check_examples, shorten
from lmadapt.models.tree import model_device


def _bar(items: Any, desc: str, progress: bool | None) -> Any:
    """tqdm over ``items``; ``progress=None`` shows it only on a terminal."""
    return tqdm(items, desc=desc, leave=False, disable=None if progress is None else not progress)


def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int = 1024,
               batch_size: int = 4, progress: bool | None = None) -> dict[str, float | int]:
    """Token-weighted perplexity over all texts: ``exp(-(1/N) sum_t log p(x_t | x_<t))``.

    Each text is tokenized as written (with the tokenizer's special tokens). A text longer than
    ``max_length`` is cut into windows of ``max_length`` tokens that overlap by one token, so every
    token after the first is predicted exactly once (from the context inside its window; a sliding
    window with a larger overlap would give more context, and a lower perplexity, at more cost).
    """
    if max_length < 2:
        raise LmadaptError(f"perplexity: max_length must be >= 2, got {max_length}")
    # verbose=False: texts longer than the model's limit are expected here, they are split below
    windows = [w for text in texts for w in _windows(list(tokenizer(text, verbose=False).input_ids), max_length)]
    windows.sort(key=len)  # similar lengths share a batch
    nll, count = 0.0, 0
    device = model_device(model)
    with eval_mode(model):
        for start in _bar(range(0, len(windows), batch_size), "perplexity", progress):
            batch = windows[start:start + batch_size]
            ids, mask = right_pad(batch, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, window in enumerate(batch):  # row by row: one float32 copy of the logits at a time
                n = len(window) - 1
                nll += F.cross_entropy(logits[row, :n].float(), ids[row, 1:n + 1], reduction="sum").item()
                count += n
    if count == 0:
        raise LmadaptError("perplexity: no tokens to score (every text is empty or a single token)")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    step = max_length - 1
    return [ids[s:s + max_length] for s in range(0, max(len(ids) - 1, 0), step)]


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


def generation_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], *,
                        match: Literal["exact", "normalized"] = "normalized", max_new_tokens: int = 16,
                        chat: bool = False, system_prompt: str | None = None, batch_size: int = 8,
                        first_line: bool = True, samples: int = 5,
                        progress: bool | None = None) -> dict[str, Any]:
    """Share of prompts whose greedy generation matches the ``answer`` (a string or a list of accepted ones).

    The prediction is the generated text, cut at its first line break when ``first_line`` (after
    leading whitespace: base models rarely stop by themselves). It is compared with :func:`answer_matches`;
    nothing else counts (an answer merely *contained* in the prediction is wrong).
    """
    if match not in ("exact", "normalized"):
        raise LmadaptError(f"generation_accuracy: match must be 'exact' or 'normalized', got {match!r}")
    check_examples("generation", examples)
    outputs = generate(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens=max_new_tokens,
                       chat=chat, system_prompt=system_prompt, batch_size=batch_size, progress=progress)
    correct, shown = 0, []
    for ex, out in zip(examples, outputs):
        prediction = out.lstrip().split("\n", 1)[0] if first_line else out
        answers = ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]]
        ok = any(answer_matches(prediction, a, match) for a in answers)
        correct += ok
        if len(shown) < samples:
            shown.append({"prompt": shorten(ex["prompt"]), "answer": ex["answer"], "prediction": prediction,
                          "correct": ok})
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples), "match": match,
            "samples": shown}


def multiple_choice_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
                             *, chat: bool = False, system_prompt: str | None = None, strategy: Strategy = "auto",
                             samples: int = 5, progress: bool | None = None) -> dict[str, Any]:
    """Pick the choice with the highest log-likelihood after the prompt; report two accuracies.

    ``accuracy`` ranks by the summed log-likelihood ``sum_t log p(c_t | x, c_<t)``, ``accuracy_per_token``
    by its mean over the choice's tokens (length-normalized per token; lm-evaluation-harness's
    ``acc_norm`` divides by the length in bytes instead). All choices of one question
    are scored in one batch (see :func:`score_continuations`). ``answer`` is an index or the choice text.
    """
    check_examples("multiple_choice", examples)
    hits_sum = hits_mean = 0
    shown = []
    for ex in _bar(examples, "multiple choice", progress):
        context = encode_prompt(tokenizer, ex["prompt"], chat=chat, system_prompt=system_prompt)
        scores = score_continuations(model, context, candidate_ids(tokenizer, ex["choices"], "choices"),
                                     strategy=strategy)
        sums = [s.sum().item() for s in scores]
        means = [s.mean().item() for s in scores]
        gold = ex["answer"] if isinstance(ex["answer"], int) else ex["choices"].index(ex["answer"])
        best_sum, best_mean = _argmax(sums), _argmax(means)
        hits_sum += best_sum == gold
        hits_mean += best_mean == gold
        if len(shown) < samples:
            shown.append({"prompt": shorten(ex["prompt"]), "choices": ex["choices"], "answer": gold,
                          "predicted": best_sum, "predicted_per_token": best_mean,
                          "log_likelihoods": [round(s, 4) for s in sums]})
    n = len(examples)
    return {"accuracy": hits_sum / n, "accuracy_per_token": hits_mean / n, "n": n, "samples": shown}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal scores


def classification_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
                            labels: list[str], *, chat: bool = False, system_prompt: str | None = None,
                            strategy: Strategy = "auto", samples: int = 5,
                            progress: bool | None = None) -> dict[str, Any]:
    """Classify each prompt by the label whose text is the likeliest continuation, ``argmax_l log p(l | x)``.

    The prompt runs once per example and every label is scored from its KV cache (complete multi-token
    labels, summed). An example's ``label`` must be one of ``labels``, exactly or after stripping
    surrounding whitespace. Returns accuracy, per-class accuracy (recall) and confusion counts
    ``confusion[gold][predicted]``.
    """
    check_examples("classification", examples)
    gold = _gold_labels(examples, labels)
    label_ids = candidate_ids(tokenizer, labels, "labels")
    _warn_on_prefix_labels(labels, label_ids)
    confusion = {g: {p: 0 for p in labels} for g in labels}
    shown = []
    for ex, g in zip(_bar(examples, "classification", progress), gold):
        context = encode_prompt(tokenizer, ex["prompt"], chat=chat, system_prompt=system_prompt)
        sums = [s.sum().item() for s in score_continuations(model, context, label_ids, strategy=strategy)]
        predicted = labels[_argmax(sums)]
        confusion[g][predicted] += 1
        if len(shown) < samples:
            shown.append({"prompt": shorten(ex["prompt"]), "label": g, "predicted": predicted,
                          "log_likelihoods": {l: round(s, 4) for l, s in zip(labels, sums)}})
    correct = sum(confusion[l][l] for l in labels)
    support = {l: sum(confusion[l].values()) for l in labels}
    per_class = {l: confusion[l][l] / support[l] for l in labels if support[l]}
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples),
            "per_class_accuracy": per_class, "confusion": confusion, "labels": list(labels), "samples": shown}


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
                              f"token-prefix of another.", stacklevel=3)
