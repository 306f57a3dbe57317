"""A model expanded with target-language tokens, and the folder that carries it (``lmadapt vocab expand``).

Vocabulary expansion (Yamaguchi et al., "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of
Target Language Text?", arXiv:2406.11477): learn ``n`` tokens by continued BPE on target text
(:func:`~lmadapt.vocab.expand.learn_new_tokens`), append them to the tokenizer
(:func:`~lmadapt.vocab.expand.extend_tokenizer`), resize the embeddings to a multiple of 8 and initialise the new
rows (:func:`~lmadapt.vocab.init.init_new_rows`). :func:`expand_model` does the three steps.

The EXPANSION FOLDER (written by :func:`save_expansion`, read by :func:`read_expansion` and by the ``new_tokens``
method) is a complete transformers model folder (resized model in safetensors + the extended tokenizer) plus
``vocab_expansion.json``::

    {"format": 1, "base_model": str, "old_tokens": len(old tokenizer), "old_rows": old embedding rows,
     "new_tokens": [{"token", "left", "right", "frequency"}, ...], "init": str, "seed": int, "init_report": {...},
     "corpus": {"files": [...], "texts": int, "words": int},
     "tokens_per_word": {"before": float, "after": float}}

Tokens per word: ``tokens(texts) / words(texts)``, words split on whitespace, no special tokens counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_dir, atomic_write_json
from lmadapt.jsonfile import read_json_object
from lmadapt.vocab.bpe import VocabError
from lmadapt.vocab.expand import NewToken, extend_tokenizer, learn_new_tokens
from lmadapt.vocab.init import (
    INIT_METHODS,
    embedding_matrices,
    init_new_rows,
    resize_for,
)

RECORD_FILE = "vocab_expansion.json"
FORMAT = 1


@dataclass
class ExpansionRecord:
    """What an expansion did: the base, the old sizes, the new tokens in id order, the initialisation and the
    corpus it was learned from. ``to_dict()`` is the content of ``vocab_expansion.json``."""

    base_model: str
    old_tokens: int
    old_rows: int
    new_tokens: list[NewToken]
    init: str
    seed: int
    init_report: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=lambda: {"files": [], "texts": 0, "words": 0})
    tokens_per_word: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``format`` first)."""
        out: dict[str, Any] = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [dataclasses.asdict(t) for t in value] if f.name == "new_tokens" else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = RECORD_FILE) -> ExpansionRecord:
        """The record in ``data`` (a parsed ``vocab_expansion.json``); :class:`VocabError` naming every bad field."""
        problems = []
        if data.get("format") != FORMAT:
            problems.append(f"format is {data.get('format')!r}, this lmadapt reads format {FORMAT}")
        for key in ("old_tokens", "old_rows", "seed"):
            if not isinstance(data.get(key), int) or isinstance(data.get(key), bool) or data[key] < 0:
                problems.append(f"{key} must be a non-negative integer, got {data.get(key)!r}")
        for key in ("base_model", "init"):
            if not isinstance(data.get(key), str):
                problems.append(f"{key} must be a string, got {data.get(key)!r}")
        raw = data.get("new_tokens")
        tokens: list[NewToken] = []
        if not isinstance(raw, list) or not raw:
            problems.append("new_tokens must be a non-empty list of {token, left, right, frequency}")
        else:
            for i, t in enumerate(raw):
                try:
                    tokens.append(NewToken(str(t["token"]), str(t["left"]), str(t["right"]), int(t["frequency"])))
                except (TypeError, KeyError, ValueError):
                    problems.append(f"new_tokens[{i}] must be {{token, left, right, frequency}}, got {t!r}")
        if problems:
            raise VocabError(f"{where} is not a valid vocabulary expansion record: " + "; ".join(problems)
                             + ". Write it again with `lmadapt vocab expand`.")
        return cls(base_model=data["base_model"], old_tokens=data["old_tokens"], old_rows=data["old_rows"],
                   new_tokens=tokens, init=data["init"], seed=data["seed"],
                   init_report=dict(data.get("init_report") or {}), corpus=dict(data.get("corpus") or {}),
                   tokens_per_word=dict(data.get("tokens_per_word") or {}))

    def new_ids(self, tokenizer: Any) -> list[int]:
        """The ids of the new tokens in ``tokenizer`` (the extended one), checked to come after every old id."""
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(t.token) for t in self.new_tokens]
        if any(i is None or i < self.old_tokens for i in ids):
            lost = [t.token for t, i in zip(self.new_tokens, ids) if i is None or i < self.old_tokens]
            raise VocabError(f"{len(lost)} new token(s) of the record are missing from the tokenizer or have an old "
                             f"id: {lost[:10]}; the tokenizer is not the one this expansion wrote.")
        return [int(i) for i in ids]


def tokens_per_word(tokenizer: Any, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word over ``texts`` (special tokens not counted); 0.0 for no words."""
    texts = [t for t in texts if t]
    words = sum(len(t.split()) for t in texts)
    if not words:
        return 0.0
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / words


def expand_model(model: Any, tokenizer: Any, texts: Iterable[str], n: int, *, init: str = "merge", seed: int = 0,
                 min_frequency: int = 2, pad_to_multiple_of: int | None = 8, progress: bool | None = False,
                 files: Sequence[str] = ()) -> tuple[Any, ExpansionRecord]:
    """Learn ``n`` new tokens from ``texts``, extend ``tokenizer``, resize ``model`` in place (rows rounded up to
    ``pad_to_multiple_of``) and initialise the new rows by ``init`` (one of :data:`INIT_METHODS`). Returns the
    extended tokenizer and the record (``files``: the corpus files, for the record only)."""
    if init not in INIT_METHODS:
        raise VocabError(f"unknown initialisation {init!r}; choose one of {', '.join(INIT_METHODS)}.")
    texts = list(texts)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < len(tokenizer):
        raise VocabError(f"the model has {old_rows} embedding rows but the tokenizer has {len(tokenizer)} tokens; "
                         "expand a model together with its own tokenizer.")
    new_tokens = learn_new_tokens(tokenizer, texts, n, min_frequency=min_frequency, progress=progress)
    new_tok = extend_tokenizer(tokenizer, new_tokens)
    resize_for(model, new_tok, pad_to_multiple_of=pad_to_multiple_of)
    report = init_new_rows(model, tokenizer, new_tok, new_tokens, init, seed=seed,
                           texts=texts if init in ("focus", "align") else None)
    base = str(getattr(model.config, "_name_or_path", "") or getattr(tokenizer, "name_or_path", "") or "")
    record = ExpansionRecord(
        base_model=base, old_tokens=len(tokenizer), old_rows=old_rows, new_tokens=list(new_tokens), init=init,
        seed=seed, init_report=dataclasses.asdict(report),
        corpus={"files": [str(f) for f in files], "texts": len(texts), "words": sum(len(t.split()) for t in texts)},
        tokens_per_word={"before": tokens_per_word(tokenizer, texts), "after": tokens_per_word(new_tok, texts)},
    )
    return new_tok, record


def save_expansion(folder: str | Path, model: Any, tokenizer: Any, record: ExpansionRecord, *,
                   overwrite: bool = False) -> Path:
    """Write the expansion folder (module docstring) atomically: into a temporary folder beside ``folder``, then
    one rename. An existing non-empty ``folder`` is refused unless ``overwrite``. Returns the folder."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD_FILE, record.to_dict())
    return Path(folder)


def read_expansion(folder: str | Path) -> tuple[Any, ExpansionRecord]:
    """The extended tokenizer and the record of an expansion folder, checked against each other.

    :class:`VocabError` when the folder or its record is missing or broken, or when the tokenizer does not hold
    the record's new tokens after its ``old_tokens`` old ones."""
    from transformers import AutoTokenizer

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise VocabError(f"vocabulary expansion folder {path} does not exist; write it with `lmadapt vocab expand` "
                         "or give the corpus in the method config instead.")
    if not (path / RECORD_FILE).is_file():
        raise VocabError(f"{path} has no {RECORD_FILE}, so it is not a vocabulary expansion folder; write it with "
                         "`lmadapt vocab expand`.")
    try:
        record = ExpansionRecord.from_dict(read_json_object(path / RECORD_FILE), str(path / RECORD_FILE))
    except LmadaptError as exc:
        if isinstance(exc, VocabError):
            raise
        raise VocabError(f"{exc}; write the folder again with `lmadapt vocab expand`.") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise VocabError(f"{path}: the extended tokenizer does not load ({exc}); write the folder again with "
                         "`lmadapt vocab expand`.") from None
    ids = record.new_ids(tokenizer)
    if ids != list(range(record.old_tokens, record.old_tokens + len(ids))) or len(tokenizer) != ids[-1] + 1:
        raise VocabError(f"{path}: the tokenizer's new tokens are not ids {record.old_tokens}.."
                         f"{record.old_tokens + len(ids) - 1} in record order (its length is {len(tokenizer)}); "
                         "the tokenizer files do not belong to this record.")
    return tokenizer, record


def expansion_rows(folder: str | Path, record: ExpansionRecord, ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows ``ids`` of the folder's input embedding (``"input"``) and, when the folder's model is untied, of its
    output layer (``"output"``), plus ``"old_input"``, the input rows of the old tokens (to check a base
    against). Read tensor by tensor from the safetensors files."""
    from lmadapt.models.shards import embedding_names, read_tensor, tensor_index

    index = tensor_index(folder)
    inp, out = embedding_names(folder)
    if inp is None or inp not in index:
        raise VocabError(f"{folder}: cannot find the input embedding among the weights (transformers does not "
                         "build this architecture from its config.json); write the folder again.")
    rows = {}
    emb = read_tensor(index, inp)
    if emb.shape[0] <= max(ids):
        raise VocabError(f"{folder}: {inp} has {emb.shape[0]} rows, fewer than the tokenizer needs ({max(ids) + 1}).")
    rows["input"], rows["old_input"] = emb[list(ids)].clone(), emb[:record.old_tokens].clone()
    del emb
    if out is not None and out in index:
        rows["output"] = read_tensor(index, out)[list(ids)].clone()
    return rows


def same_base(model: Any, old_input: torch.Tensor) -> bool:
    """Whether ``model``'s old input rows equal ``old_input`` up to a dtype rounding (bf16: relative 1e-2), i.e.
    the expansion was made from this base model."""
    mine = embedding_matrices(model)[0][:old_input.shape[0]].detach().float().cpu()
    if mine.shape != old_input.shape:
        return False
    scale = float(old_input.float().abs().max()) or 1.0
    return float((mine - old_input.float()).abs().max()) <= 1e-2 * scale
