"""The ``tagging`` task: entity-level precision, recall and F1 of a token-classification head (objective ``tag``).

Rows are ``{"tokens": [words], "tags": [BIO tags]}``, as training's ``tagging`` format. Each row's words are
tokenized as training tokenizes them (each word on its own, the adapter's recorded separator before every word
but the first, :mod:`lmadapt.data.tagging`), the head is read at every word's first sub-token, and the word's
predicted tag is the argmax there. A word cut off by ``max_length`` is predicted ``O``.

Entities follow seqeval's default mode (conlleval): an entity is a maximal run ``B-X I-X ... I-X``; ``I-X`` after
``O``, after an entity of another type, or first in the row starts an entity too, and ``B-X`` always does.
Over all rows, with G the gold and P the predicted entities as (row, type, start, end):

    precision = |G ∩ P| / |P|      recall = |G ∩ P| / |G|      F1 = 2 precision recall / (precision + recall)

(0 when a denominator is 0: seqeval's zero_division=0), micro over the types, and per type the same over that
type's entities. ``accuracy`` is the share of words whose tag is right.

A model without a tag head (the base model, evaluated before training) gets null metrics and a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.data.tagging import (
    OUTSIDE,
    entity_type,
    first_subtokens,
    tag_problem,
    tokenize_words,
)
from lmadapt.decoding.scoring import right_pad
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import progress_bar
from lmadapt.evaluation.registry import EvalTask, register_task
from lmadapt.models.tree import model_device
from lmadapt.objectives.heads import HEAD, ScoreHead
from lmadapt.objectives.tag import Tag

Entity = tuple[str, int, int]  # (type, first word, one past the last word)


def entities(tags: list[str]) -> list[Entity]:
    """The entities of one row's BIO tags, conlleval's way (see the module docstring)."""
    found: list[Entity] = []
    start, kind = -1, None
    for i, tag in enumerate([*tags, OUTSIDE]):
        t = entity_type(tag)
        begins = t is not None and (tag.startswith("B-") or t != kind)
        if kind is not None and (t is None or begins):
            found.append((kind, start, i))
            kind = None
        if begins:
            start, kind = i, t
    return found


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Micro precision/recall/F1 over every row's entities, and per type (with ``support``, the gold count)."""
    g = {(row, *e) for row, tags in enumerate(gold) for e in entities(tags)}
    p = {(row, *e) for row, tags in enumerate(predicted) for e in entities(tags)}
    hit = g & p
    types = sorted({e[1] for e in g | p})
    per_type = {t: {**_prf(sum(e[1] == t for e in hit), sum(e[1] == t for e in p), sum(e[1] == t for e in g)),
                    "support": sum(e[1] == t for e in g)} for t in types}
    return {**_prf(len(hit), len(p), len(g)), "per_type": per_type, "gold_entities": len(g),
            "predicted_entities": len(p)}


def predict_tags(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[list[str]], *,
                 max_length: int = 1024, batch_size: int = 4, progress: bool | None = None) -> list[list[str]]:
    """The tag the model's tag head predicts for every word of ``rows`` (lists of words); see the module
    docstring."""
    from lmadapt.data.tokens import special_prefix

    head = getattr(model, HEAD, None)
    config = getattr(head, "tag_config", None)
    if not isinstance(head, ScoreHead) or config is None:
        raise LmadaptError("the model carries no tag head: load an adapter trained with objective tag")
    objective, names = Tag(config), list(config.labels)
    separator = " " if config.word_separator is None else config.word_separator
    prefix = special_prefix(tokenizer)
    encoded = [tokenize_words(tokenizer, words, separator, prefix) for words in rows]
    encoded = [(ids[:max_length], word_of[:max_length]) for ids, word_of in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[str]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    for start in progress_bar(range(0, len(order), batch_size), "tagging", progress, unit="batches"):
        chunk = order[start:start + batch_size]
        ids, mask = right_pad([encoded[i][0] for i in chunk], model_device(model), pad)
        best = objective.token_logits(model, {"input_ids": ids, "attention_mask": mask}).argmax(-1).cpu()
        for b, i in enumerate(chunk):
            first = first_subtokens(encoded[i][1], len(rows[i]))
            out[i] = [names[int(best[b, t])] if t >= 0 else OUTSIDE for t in first]
    return out


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    gold = [list(row["tags"]) for row in rows]
    head = getattr(model, HEAD, None)
    if not isinstance(head, ScoreHead) or getattr(head, "tag_config", None) is None:
        note = "the model carries no tag head (e.g. the base model before training)"
        return ({"f1": None, "precision": None, "recall": None, "n": len(rows), "note": note},
                [{"prediction": None, "gold": g, "score": None, "correct": None} for g in gold])
    predicted = predict_tags(model, tokenizer, [list(row["tokens"]) for row in rows], max_length=cfg.max_length,
                             batch_size=cfg.batch_size, progress=progress)
    scores = entity_scores(gold, predicted)
    words = sum(map(len, gold))
    right = sum(a == b for g, p in zip(gold, predicted) for a, b in zip(g, p))
    preds = [{"prediction": p, "gold": g, "score": entity_scores([g], [p])["f1"], "correct": p == g}
             for g, p in zip(gold, predicted)]
    return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
            "accuracy": right / words, "n": len(rows), "gold_entities": scores["gold_entities"],
            "predicted_entities": scores["predicted_entities"],
            "per_type_f1": {t: s["f1"] for t, s in scores["per_type"].items()}, "per_type": scores["per_type"]}, preds


def _words_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        return f"expected a non-empty list of non-empty strings, got {value!r:.60}"
    return None


def _tags_problem(value: Any, row: Mapping[str, Any], cfg: EvalConfig | None) -> str | None:
    if not isinstance(value, list):
        return f"expected a list of BIO tags, got {type(value).__name__}"
    bad = [f"{i}: {tag!r} is {problem}" for i, tag in enumerate(value) if (problem := tag_problem(tag))]
    if bad:
        return "; ".join(bad[:3])
    words = row.get("tokens")
    if isinstance(words, list) and len(words) != len(value):
        return f"{len(value)} tags for {len(words)} words; give one tag per word"
    return None


TASK = register_task(EvalTask(
    name="tagging", fields={"tokens": _words_problem, "tags": _tags_problem},
    reads=("max_length", "batch_size"), run=_run,
    summary="entity precision/recall/F1 (seqeval's default) of the tag head of an adapter trained with objective tag"))


__all__ = ["entities", "entity_scores", "predict_tags"]
