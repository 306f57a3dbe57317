"""The ``head_classification`` task: the class a classification head (objective ``classify``) predicts.

Unlike ``classification`` (which scores label words with the LM head), this reads the linear head an adapter
trained with objective ``classify`` carries, with its pooling and causal-mask removal, and reports accuracy and
macro-F1 (the unweighted mean over the classes of F1 = 2 P R / (P + R); a class never predicted nor present
counts 0 only when it is present or predicted, as scikit-learn's ``f1_score(average="macro")`` with the labels
that occur), per-class F1 and the confusion counts; multi-label heads (rows label a list of classes) the metrics of
:func:`multi_label_metrics`; regression heads report MSE and MAE. Each text is tokenized
as training tokenizes a classification row with ``data.add_eos: true`` (the default): the tokenizer's own
leading special tokens, the text, EOS; texts longer than ``max_length`` keep their first tokens.

A model without such a head (the base model, evaluated before training) gets null metrics and a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.scoring import right_pad
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import progress_bar, string_problem
from lmadapt.evaluation.registry import EvalTask, register_task
from lmadapt.models.tree import model_device
from lmadapt.objectives.classify import HEAD, Classify, ScoreHead


def head_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int = 1024,
                batch_size: int = 4, progress: bool | None = None) -> torch.Tensor:
    """(N, C) float32 logits of the model's classification head for ``texts`` (see the module docstring)."""
    from lmadapt.data.tokens import special_prefix

    head = getattr(model, HEAD, None)
    if not isinstance(head, ScoreHead) or getattr(head, "classify_config", None) is None:
        raise LmadaptError("the model carries no sequence classification head: load an adapter trained with "
                           "objective classify (a tag head labels tokens: use the tagging task)")
    objective = Classify(head.classify_config)
    prefix, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    rows = [(prefix + tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
            [:max_length] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(rows), head.out_features)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
    for start in progress_bar(range(0, len(order), batch_size), "head_classification", progress, unit="batches"):
        chunk = order[start:start + batch_size]
        ids, mask = right_pad([rows[i] for i in chunk], model_device(model), pad)
        out[chunk] = objective.logits(model, {"input_ids": ids, "attention_mask": mask}).float().cpu()
    return out


def f1_scores(gold: list[int], predicted: list[int], classes: list[int]) -> dict[int, float]:
    """Per-class F1 = 2 TP / (2 TP + FP + FN) (0 when the class is neither present nor predicted)."""
    out = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def multi_label_metrics(gold: list[set[int]], predicted: list[set[int]], n_labels: int) -> dict[str, Any]:
    """Predicted label sets against gold ones, as scikit-learn scores indicator matrices: ``subset_accuracy`` (the
    share of rows whose set is exactly right, ``accuracy_score``), ``micro_f1`` (2 ΣTP / (2 ΣTP + ΣFP + ΣFN) over
    every (row, label) cell), ``macro_f1`` (the mean per-label F1 over all ``n_labels`` labels, ``average="macro"``)
    and ``per_label_f1``; an F1 without TP, FP or FN is 0 (``zero_division=0``). ``correct``: rows exactly right."""
    per_label, tp, fp_fn = {}, 0, 0
    for c in range(n_labels):
        g, p = [int(c in row) for row in gold], [int(c in row) for row in predicted]
        per_label[c] = f1_scores(g, p, [1])[1]
        tp += sum(a & b for a, b in zip(g, p))
        fp_fn += sum(a ^ b for a, b in zip(g, p))
    exact = sum(g == p for g, p in zip(gold, predicted))
    micro = 2 * tp / (2 * tp + fp_fn) if tp + fp_fn else 0.0
    return {"subset_accuracy": exact / max(1, len(gold)), "micro_f1": micro,
            "macro_f1": sum(per_label.values()) / max(1, n_labels), "correct": exact, "per_label_f1": per_label}


def _gold(rows: list[dict[str, Any]], names: list[str], n_classes: int, multi: bool = False) -> list[Any]:
    """Each row's class index (or, ``multi``, its set of class indices: a list of labels, or one label)."""
    out, problems = [], []
    for i, row in enumerate(rows):
        labels = row["label"] if multi and isinstance(row["label"], list) else [row["label"]]
        found = []
        for label in labels:
            if isinstance(label, str) and label in names:
                found.append(names.index(label))
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n_classes:
                found.append(label)
            else:
                known = f"one of {names}" if names else f"a class index 0 to {n_classes - 1}"
                lists = " (or a list of them: the head is multi-label)" if multi else ""
                problems.append(f"example {i}: field 'label': {label!r} is not {known}{lists}")
        out.append(set(found) if multi else found[0] if found else -1)
    if problems:
        raise DataError(problems, hint="Fix these rows of the evaluation data.")
    return out


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    head = getattr(model, HEAD, None)
    if not isinstance(head, ScoreHead) or getattr(head, "classify_config", None) is None:
        note = ("the model carries no sequence classification head (e.g. the base model before training, or a "
                "tag head, which the tagging task reads)")
        return ({"accuracy": None, "macro_f1": None, "n": len(rows), "note": note},
                [{"prediction": None, "gold": row["label"], "score": None, "correct": None} for row in rows])
    config = head.classify_config
    logits = head_logits(model, tokenizer, [row["text"] for row in rows], max_length=cfg.max_length,
                         batch_size=cfg.batch_size, progress=progress)
    if config.problem == "regression":
        values = logits[:, 0].tolist()
        gold_values = [float(row["label"]) for row in rows]
        err = [v - g for v, g in zip(values, gold_values)]
        preds = [{"prediction": v, "gold": g, "score": v, "correct": None} for v, g in zip(values, gold_values)]
        return {"mse": sum(e * e for e in err) / len(err), "mae": sum(map(abs, err)) / len(err), "n": len(rows)}, preds
    names = list(config.labels)
    n_classes = logits.shape[1]
    if config.problem == "multi_label":
        return _multi_label(logits, rows, names)
    gold = _gold(rows, names, n_classes)
    predicted = logits.argmax(-1).tolist()
    name = (lambda c: names[c]) if names else (lambda c: c)
    f1 = f1_scores(gold, predicted, sorted(set(gold) | set(predicted)))
    confusion = {str(name(g)): {str(name(p)): 0 for p in range(n_classes)} for g in range(n_classes)}
    for g, p in zip(gold, predicted):
        confusion[str(name(g))][str(name(p))] += 1
    correct = sum(g == p for g, p in zip(gold, predicted))
    probs = logits.softmax(-1)
    preds = [{"prediction": name(p), "gold": name(g), "score": float(probs[i, p]), "correct": p == g}
             for i, (g, p) in enumerate(zip(gold, predicted))]
    return {"accuracy": correct / len(rows), "macro_f1": sum(f1.values()) / len(f1), "correct": correct,
            "n": len(rows), "per_class_f1": {str(name(c)): v for c, v in f1.items()}, "confusion": confusion}, preds


def _multi_label(logits: torch.Tensor, rows: list[dict[str, Any]],
                 names: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A multi-label head's metrics (:func:`multi_label_metrics`) and predictions: label c is predicted when
    sigmoid(z_c) > 0.5, i.e. z_c > 0, the rule training's ``exact_match`` uses."""
    gold = _gold(rows, names, logits.shape[1], multi=True)
    probs = logits.sigmoid()
    predicted = [set((row > 0).nonzero().flatten().tolist()) for row in logits]
    metrics = multi_label_metrics(gold, predicted, logits.shape[1])
    name = (lambda c: names[c]) if names else (lambda c: c)
    metrics["per_label_f1"] = {str(name(c)): v for c, v in metrics["per_label_f1"].items()}
    preds = [{"prediction": [name(c) for c in sorted(p)], "gold": [name(c) for c in sorted(g)],
              "score": {str(name(c)): float(probs[i, c]) for c in range(logits.shape[1])}, "correct": p == g}
             for i, (g, p) in enumerate(zip(gold, predicted))]
    return {**metrics, "n": len(rows)}, preds


def _label_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return None
    if isinstance(value, list):  # a multi-label row: names or class indices
        bad = [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]
        return None if not bad else f"a list of labels holds {bad[0]!r}; give class names or indices"
    return string_problem(value)


TASK = register_task(EvalTask(
    name="head_classification", fields={"text": string_problem, "label": _label_problem},
    reads=("max_length", "batch_size"), run=_run,
    summary="the class predicted by the classification head of an adapter trained with objective classify"))
