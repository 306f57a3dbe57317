"""Which tensor of a model gets which Delta of a diff (:mod:`lmadapt.updates.diff`), decided from headers alone.

Tensors pair by name. Two exceptions, both from "Efficient Model Development through Fine-tuning Transfer"
(arXiv:2503.20110) being applied across versions: the embedding and output matrices pair row by row for the
tokens both vocabularies hold (rows only the new model has stay as they are), and when the diff's models tie
the output layer to the embeddings but the new model has its own, that layer gets the embeddings' Delta.
Everything else that does not pair (a name on one side only, another shape) is a problem, named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmadapt.models.shards import TensorInfo, embedding_names, model_folder

TOKENIZER_DIR = "tokenizer"  # the tuned model's tokenizer inside a diff folder
STORED = ("dense", "lowrank", "topk")  # encodings that carry a Delta

Rows = tuple[torch.Tensor, torch.Tensor]  # (row ids in the model, row ids in the diff)


@dataclass
class ApplyPlan:
    """What :func:`lmadapt.updates.diff.apply_diff` does to each tensor of the model."""

    sources: dict[str, str] = field(default_factory=dict)  # model tensor -> the diff tensor whose Delta it gets
    problems: dict[str, str] = field(default_factory=dict)  # tensor -> why it does not pair
    rows: dict[str, Rows | None] = field(default_factory=dict)  # token-row tensors: rows paired (None: all, in order)
    vocabulary: dict[str, Any] | None = None  # how token rows were paired, for the record
    notes: list[str] = field(default_factory=list)


def pair_problems(first: Mapping[str, TensorInfo], second: Mapping[str, TensorInfo], first_name: str,
                  second_name: str) -> dict[str, str]:
    """name -> why, for every tensor only one side has or whose shapes differ, sorted by name."""
    out = {n: f"only in {first_name}" for n in first if n not in second}
    out |= {n: f"only in {second_name}" for n in second if n not in first}
    out |= {n: f"shape {list(first[n].shape)} in {first_name}, {list(second[n].shape)} in {second_name}"
            for n in first if n in second and first[n].shape != second[n].shape}
    return dict(sorted(out.items()))


def plan_apply(diff: str | Path, info: Mapping[str, Any], model: str | Path,
               index: Mapping[str, TensorInfo]) -> ApplyPlan:
    """Pair the tensors of ``model`` (its ``index``) with the entries of the diff's ``info`` (its diff.json)."""
    entries: Mapping[str, dict[str, Any]] = info["tensors"]
    emb = info.get("embeddings") or {}
    d_in, d_out, d_tied = emb.get("input"), emb.get("output"), bool(emb.get("tied"))
    n_in, n_out = embedding_names(model)
    n_tied = n_out is not None and n_out not in index
    plan = ApplyPlan()
    pairs = {n: n for n in index if n in entries}
    if d_tied and n_out in index and n_out not in entries and d_in in entries:
        pairs[n_out] = d_in
        plan.notes.append(f"{n_out}: the diff's models tie it to {d_in}, so it gets {d_in}'s Delta")
    for name in index:
        if name not in pairs:
            plan.problems[name] = f"only in model {model} (the diff's models have no such tensor)"
    for name, entry in entries.items():
        if name in index or entry["encoding"] == "skipped":
            continue
        if n_tied and name == d_out:
            if entry["encoding"] in STORED:
                plan.problems[name] = (f"changed in the diff, but model {model} ties its output layer to {n_in} "
                                       f"(tie_word_embeddings), so it has no separate tensor to add it to")
            continue
        plan.problems[name] = f"only in the diff {diff} (model {model} has no such tensor)"
    token_rows = {n_in, n_out} - {None}
    row_sizes: dict[str, tuple[int, int]] = {}
    for name, source in pairs.items():
        entry, shape = entries[source], index[name].shape
        if entry["encoding"] == "skipped":
            plan.notes.append(f"{name}: no Delta (skipped when the diff was extracted: {entry.get('reason')})")
            continue
        stored = tuple(entry["shape"])
        is_rows = name in token_rows and source in {d_in, d_out} and len(shape) == 2
        if (stored[1:] != shape[1:]) if is_rows else (stored != shape):
            plan.problems[name] = f"shape {list(stored)} in the diff, {list(shape)} in model {model}"
        elif entry["encoding"] in STORED:
            plan.sources[name] = source
            if is_rows:
                row_sizes[name] = (stored[0], shape[0])
    if row_sizes:
        _pair_rows(plan, Path(diff) / TOKENIZER_DIR, model, row_sizes)
    plan.problems = dict(sorted(plan.problems.items()))
    return plan


def _pair_rows(plan: ApplyPlan, diff_tokenizer: Path, model: str | Path,
               row_sizes: dict[str, tuple[int, int]]) -> None:
    """Fill ``plan.rows`` and ``plan.vocabulary`` for the token-row tensors ``row_sizes`` (name -> rows in the
    diff, rows in the model)."""
    old_vocab, new_vocab = _vocab(diff_tokenizer), _vocab(model_folder(model))
    by_token = old_vocab is not None and new_vocab is not None
    plan.vocabulary = {"matched_by": "token" if by_token else "position (a tokenizer could not be read)",
                       "tensors": {}}
    for name, (v_old, v_new) in row_sizes.items():
        pairs = _row_pairs(old_vocab, new_vocab, v_old, v_new) if by_token else {i: i for i in range(min(v_old,
                                                                                                        v_new))}
        in_order = v_old == v_new and len(pairs) == v_new and all(i == j for i, j in pairs.items())
        ids = sorted(pairs)
        plan.rows[name] = None if in_order else (torch.tensor(ids, dtype=torch.long),
                                                 torch.tensor([pairs[i] for i in ids], dtype=torch.long))
        plan.vocabulary["tensors"][name] = {
            "diff_rows": v_old, "model_rows": v_new, "shared_rows": len(pairs),
            "moved_rows": sum(i != j for i, j in pairs.items()), "rows_only_in_model": v_new - len(pairs)}


def _row_pairs(old_vocab: dict[str, int], new_vocab: dict[str, int], v_old: int, v_new: int) -> dict[int, int]:
    """model row -> diff row for every token both vocabularies hold; rows no token names on either side (padding
    to a round size) pair by position."""
    pairs = {new: old_vocab[tok] for tok, new in new_vocab.items()
             if tok in old_vocab and new < v_new and old_vocab[tok] < v_old}
    named_old, named_new = set(old_vocab.values()), set(new_vocab.values())
    pairs |= {i: i for i in range(min(v_old, v_new)) if i not in named_old and i not in named_new}
    return pairs


def _vocab(folder: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer in ``folder``, or None when there is none that can be read."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return None
    try:
        return dict(AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab())
    except (OSError, ValueError, KeyError, TypeError):
        return None
