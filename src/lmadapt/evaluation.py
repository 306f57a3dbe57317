"""Evaluation: perplexity, generation accuracy, multiple-choice and classification accuracy.

Each task is a function on in-memory examples; :func:`evaluate` reads the examples from files
(:class:`EvalConfig`: one entry of a run config's ``evals:`` list, or the flags of ``lmadapt eval``) and
dispatches. :func:`compare_table` shows base vs adapted.

Scoring rule (multiple choice and classification). The prompt becomes token ids as in
:func:`lmadapt.generation.encode_prompt` (as written, or a chat turn with the assistant's turn opened);
each candidate (choice or label) is tokenized *on its own, as written, without special tokens*, and
appended. Its score is the log-likelihood of those tokens given the prompt::

    log p(c | x) = sum_t log softmax(f(x ++ c_<t))[c_t]

So write candidates the way the model would continue the prompt: ``" sport"`` after ``"Topic:"`` for
byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen); ``"sport"`` with ``chat=True`` (the start of
the assistant's turn); without the space for SentencePiece tokenizers (Llama 2, Mistral), which add one.
A candidate that is a token-prefix of another always wins the summed score over it (the longer one
pays for its extra tokens): you are warned when labels look like that.
"""

from __future__ import annotations

import inspect
import math
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmadapt.config import option
from lmadapt.errors import DataError, LmadaptError
from lmadapt.generation import encode_prompt, eval_mode, generate

Task = Literal["perplexity", "generation", "multiple_choice", "classification"]
Strategy = Literal["auto", "cached", "batched"]
_COUNTS = {"n", "correct", "tokens"}  # counts, not metrics: left out of compare_table


@dataclass
class EvalConfig:
    task: Task = option(help="perplexity | generation | multiple_choice | classification.")
    data: list[str] = option(help="Evaluation files or globs (JSONL, JSON, CSV, Parquet).")
    text_field: str = option("text", "perplexity: the field holding the text.")
    prompt_field: str = option("prompt", "generation, multiple_choice, classification: the prompt field.")
    answer_field: str = option("answer", "generation: expected answer (string or list of accepted strings); "
                                         "multiple_choice: index (0-based) or text of the right choice.")
    choices_field: str = option("choices", "multiple_choice: the field holding the list of choices.")
    label_field: str = option("label", "classification: the field holding the gold label.")
    labels: list[str] = option([], "classification: candidate labels, scored as written (e.g. ' sport'); "
                                   "empty: the sorted set of labels in the data.")
    chat: bool = option(False, "Render prompts with the tokenizer's chat template (ignored by perplexity).")
    system_prompt: str | None = option(None, "System message for chat=True.")
    match: Literal["exact", "normalized"] = option(
        "normalized", "generation: exact (after stripping whitespace) or normalized (lowercase, no punctuation, "
                      "articles or extra spaces, as in SQuAD) comparison.")
    max_new_tokens: int = option(16, "generation: tokens to generate per prompt.")
    max_length: int = option(1024, "perplexity: window length in tokens; longer texts are split.")
    batch_size: int = option(4, "Sequences per forward pass (perplexity windows, generation prompts).")
    max_examples: int | None = option(None, "Evaluate only the first N examples (null: all).")

    def check(self) -> list[str]:
        problems = []
        if not self.data:
            problems.append("data: give at least one file or glob")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            problems.append(f"max_length: must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"max_examples: must be >= 1 or null, got {self.max_examples}")
        if self.labels and len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: duplicates in {self.labels}")
        return problems


def _bar(items: Any, desc: str, progress: bool | None) -> Any:
    """tqdm over ``items``; ``progress=None`` shows it only on a terminal."""
    return tqdm(items, desc=desc, leave=False, disable=None if progress is None else not progress)


# ----------------------------------------------------------------------------------------------- perplexity

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
    device = _device(model)
    with eval_mode(model):
        for start in _bar(range(0, len(windows), batch_size), "perplexity", progress):
            batch = windows[start:start + batch_size]
            ids, mask = _right_pad(batch, device)
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


def _right_pad(rows: list[list[int]], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------- continuation scoring

def score_continuations(model: nn.Module, context: list[int], continuations: list[list[int]], *,
                        strategy: Strategy = "auto") -> list[torch.Tensor]:
    """Per-token log-probabilities ``log p(c_t | context, c_<t)`` of each continuation (float64, CPU).

    ``cached`` runs the context once, repeats its KV cache ``len(continuations)`` times and runs all
    continuations in one batch; ``batched`` runs context + continuation for all of them in one batch.
    ``auto`` picks ``cached`` (the faster on CPU when the context is longer than the continuations).
    """
    if strategy not in ("auto", "cached", "batched"):
        raise LmadaptError(f"score_continuations: strategy must be 'auto', 'cached' or 'batched', got {strategy!r}")
    if not context:
        raise LmadaptError("score_continuations: the context is empty; a first token needs something to follow")
    if any(not c for c in continuations):
        raise LmadaptError("score_continuations: a continuation tokenizes to no tokens")
    with eval_mode(model):
        if strategy == "batched":
            return _score_batched(model, context, continuations)
        return _score_cached(model, context, continuations)


def _forward(model: nn.Module, keep: int, **inputs: Any) -> Any:
    """Model outputs, computing the logits of only the last ``keep`` positions when the model allows it."""
    if "logits_to_keep" in _forward_parameters(model):
        inputs["logits_to_keep"] = keep
    return model(**inputs)


def _forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def continuation_logits(model: nn.Module, context: list[int], continuations: list[list[int]]) -> torch.Tensor | None:
    """(continuations, longest, vocab) logits at every continuation position (position t predicts token t).

    The context runs once; the continuations (all but their last token, which predicts nothing scored) run
    as one right-padded batch from its KV cache repeated per continuation. Positions past a continuation's
    end are padding. None when the model's cache cannot be repeated (then score context + continuation
    rows instead). The model is called as it is: wrap it in eval mode or ``adapters_disabled`` outside.
    """
    device, n, p = _device(model), len(continuations), len(context)
    out = _forward(model, 1, input_ids=torch.tensor([context], device=device), use_cache=True)
    first = out.logits[:, -1:].expand(n, -1, -1)  # predicts each continuation's first token
    rest = [c[:-1] for c in continuations]
    width = max(len(r) for r in rest)
    cache = out.past_key_values
    if width == 0:  # single-token continuations: the context forward was all we needed
        return first
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(n)
    ids, mask = _right_pad([r or [0] for r in rest], device)  # a one-token continuation gets a dummy row
    mask = torch.cat([torch.ones((n, p), dtype=torch.long, device=device), mask], dim=1)
    positions = torch.arange(p, p + width, device=device).expand(n, -1)
    later = _forward(model, width, input_ids=ids, attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True).logits
    return torch.cat([first, later], dim=1)


def _score_cached(model: nn.Module, context: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    logits = continuation_logits(model, context, continuations)
    if logits is None:
        return _score_batched(model, context, continuations)
    scores = []
    for i, c in enumerate(continuations):
        logp = logits[i, :len(c)].double().log_softmax(-1).cpu()
        scores.append(logp.gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1))
    return scores


def _score_batched(model: nn.Module, context: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    device, p = _device(model), len(context)
    width = max(len(c) for c in continuations)
    ids, mask = _right_pad([context + c for c in continuations], device)
    # Only positions p-1 .. p+width-2 predict continuation tokens: keep the logits of the last width+1.
    logits = _forward(model, width + 1, input_ids=ids, attention_mask=mask, use_cache=False).logits
    offset = ids.shape[1] - logits.shape[1]  # 0 when the model returned every position
    scores = []
    for i, c in enumerate(continuations):
        rows = logits[i, p - 1 - offset:p - 1 - offset + len(c)].double().log_softmax(-1).cpu()
        scores.append(rows.gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1))
    return scores


def _candidate_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], what: str) -> list[list[int]]:
    """Each candidate tokenized on its own, as written, without special tokens."""
    ids = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    empty = [repr(t) for t, i in zip(texts, ids) if not i]
    if empty:
        raise LmadaptError(f"{what} {', '.join(empty)} tokenize(s) to no tokens; give non-empty strings")
    return ids


# --------------------------------------------------------------------------------------- examples and checks

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


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]  # the end of a prompt is what matters


# --------------------------------------------------------------------------------------- generation accuracy

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
            shown.append({"prompt": _short(ex["prompt"]), "answer": ex["answer"], "prediction": prediction,
                          "correct": ok})
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples), "match": match,
            "samples": shown}


# ----------------------------------------------------------------------------------- multiple-choice accuracy

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
        scores = score_continuations(model, context, _candidate_ids(tokenizer, ex["choices"], "choices"),
                                     strategy=strategy)
        sums = [s.sum().item() for s in scores]
        means = [s.mean().item() for s in scores]
        gold = ex["answer"] if isinstance(ex["answer"], int) else ex["choices"].index(ex["answer"])
        best_sum, best_mean = _argmax(sums), _argmax(means)
        hits_sum += best_sum == gold
        hits_mean += best_mean == gold
        if len(shown) < samples:
            shown.append({"prompt": _short(ex["prompt"]), "choices": ex["choices"], "answer": gold,
                          "predicted": best_sum, "predicted_per_token": best_mean,
                          "log_likelihoods": [round(s, 4) for s in sums]})
    n = len(examples)
    return {"accuracy": hits_sum / n, "accuracy_per_token": hits_mean / n, "n": n, "samples": shown}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal scores


# ------------------------------------------------------------------------------------ classification accuracy

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
    label_ids = _candidate_ids(tokenizer, labels, "labels")
    _warn_on_prefix_labels(labels, label_ids)
    confusion = {g: {p: 0 for p in labels} for g in labels}
    shown = []
    for ex, g in zip(_bar(examples, "classification", progress), gold):
        context = encode_prompt(tokenizer, ex["prompt"], chat=chat, system_prompt=system_prompt)
        sums = [s.sum().item() for s in score_continuations(model, context, label_ids, strategy=strategy)]
        predicted = labels[_argmax(sums)]
        confusion[g][predicted] += 1
        if len(shown) < samples:
            shown.append({"prompt": _short(ex["prompt"]), "label": g, "predicted": predicted,
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


# ---------------------------------------------------------------------------------------------- from files

def load_examples(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The examples of ``cfg.data`` with canonical keys (text, prompt, answer, choices, label).

    Raises :class:`DataError` naming ``file:line`` and the field for every malformed row (of the first
    ``max_examples`` rows) and every row :func:`lmadapt.data.read_records` could not read.
    """
    from lmadapt.data import read_records  # lazily: only evaluation from files needs the data module

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


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, *,
             progress: bool | None = None) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes; the result is a JSON-ready dict with ``task`` and the metrics.

    The model is evaluated in eval mode under ``torch.inference_mode()``; its train/eval mode is
    restored afterwards.
    """
    examples = load_examples(cfg)
    common = {"chat": cfg.chat, "system_prompt": cfg.system_prompt, "progress": progress}
    with eval_mode(model):
        if cfg.task == "perplexity":
            result: dict[str, Any] = perplexity(model, tokenizer, [ex["text"] for ex in examples],
                                                max_length=cfg.max_length, batch_size=cfg.batch_size,
                                                progress=progress)
        elif cfg.task == "generation":
            result = generation_accuracy(model, tokenizer, examples, match=cfg.match,
                                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, **common)
        elif cfg.task == "multiple_choice":
            result = multiple_choice_accuracy(model, tokenizer, examples, **common)
        elif cfg.task == "classification":
            labels = list(cfg.labels) or sorted({ex["label"] for ex in examples})
            result = classification_accuracy(model, tokenizer, examples, labels, **common)
        else:
            raise LmadaptError(f"eval.task: unknown task {cfg.task!r}")
    return {"task": cfg.task, **result}


# --------------------------------------------------------------------------------------------- comparison

def compare_table(rows: list[tuple[str, dict[str, Any], dict[str, Any]]], *, markdown: bool = False) -> str:
    """A before/after table: one line per (evaluation, metric) with the base value, the adapted one and
    the change. Aligned plain text for a terminal, or a Markdown table with ``markdown=True``.

    ``rows`` are ``(name, base_result, adapted_result)``; the metrics are the numbers in the results
    (and in one level of nested dicts, e.g. ``per_class_accuracy[sport]``), counts such as ``n`` left out.
    """
    header = ("eval", "metric", "base", "adapted", "change")
    lines = []
    for name, before, after in rows:
        flat_before, flat_after = _metrics(before), _metrics(after)
        for key in list(flat_after) + [k for k in flat_before if k not in flat_after]:
            b, a = flat_before.get(key), flat_after.get(key)
            change = _number(a - b, signed=True) if a is not None and b is not None else "-"
            lines.append((name, key, _number(b), _number(a), change))
    if markdown:
        out = ["| " + " | ".join(header) + " |", "| --- | --- | ---: | ---: | ---: |"]
        return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines])


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if _is_number(value) and key not in _COUNTS:
            out[key] = float(value)
        elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
            out.update({f"{key}[{str(k).strip()}]": float(v) for k, v in value.items()})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return f"{value:{sign}.4f}" if abs(value) < 1000 else f"{value:{sign}.1f}"
