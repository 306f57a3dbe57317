"""Tagging rows (``data.format: tagging``): words with one BIO tag each, aligned to sub-tokens.

A row is ``{"tokens": [w_1, ..., w_n], "tags": [t_1, ..., t_n]}`` (keys ``data.tokens_field``/``tags_field``),
each tag ``O``, ``B-<type>`` or ``I-<type>`` (IOB2). Tokenization follows transformers' ``is_split_into_words``:
each word is tokenized on its own, with ``data.word_separator`` (a space by default; ``""`` for Chinese) before
every word but the first, after the tokenizer's own leading special tokens (BOS)::

    ids = prefix + tok(w_1) + tok(sep + w_2) + ... + tok(sep + w_n)        (no EOS)

So every token belongs to exactly one word. Tokenizing the joined text once and mapping tokens to words by their
character offsets would give the same tokens for byte-level BPE with a space separator (its pre-tokenizer cuts
before every space anyway), but with ``""`` a merge may swallow the start of the next word, leaving a word
without a token of its own (a Chinese name whose first character shares a token with the word before).

Labels, as transformers' token-classification examples align them: the **first** sub-token of word i carries
t_i's index in the tag set, every other token -100 (``labels``). ``later`` holds, for the other sub-tokens of
each word, its tag with ``B-X`` turned into ``I-X`` (-100 where the tag set has no ``I-X``): objective ``tag``
trains on them too with ``label_all_subtokens: true``. A prediction for a word is read at its first sub-token.

``I-X`` after ``O`` or after another type is accepted, as conlleval and seqeval's default mode accept it: it
starts an entity (:func:`lmadapt.evaluation.tasks.tagging.entities`).

The tag set is ``data.labels``, else it is collected from the training rows: ``O``, then ``B-X``, ``I-X`` for
each type X in sorted order (both, even if only one occurs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lmadapt.data.tokens import IGNORE

OUTSIDE = "O"


def tag_problem(tag: Any) -> str | None:
    """Why ``tag`` is not a BIO tag (``O``, ``B-<type>``, ``I-<type>``), or None."""
    if not isinstance(tag, str):
        return f"expected a tag string, got {type(tag).__name__}"
    if tag == OUTSIDE or (tag[:2] in ("B-", "I-") and tag[2:].strip()):
        return None
    return "not a BIO tag: expected O, B-<type> or I-<type> (convert BIOES/BILOU tags to BIO first)"


def entity_type(tag: str) -> str | None:
    """``X`` for ``B-X`` or ``I-X``; None for ``O``."""
    return None if tag == OUTSIDE else tag[2:]


def collect_tags(rows: Iterable[Any]) -> list[str]:
    """The tag set of rows' tag lists (malformed values skipped): ``O``, then ``B-X``, ``I-X`` per type, sorted."""
    types = {entity_type(t) for tags in rows if isinstance(tags, list) for t in tags if tag_problem(t) is None}
    types.discard(None)
    return [OUTSIDE] + [f"{p}-{x}" for x in sorted(types) for p in ("B", "I")]  # type: ignore[type-var]


def tokenize_words(tokenizer: Any, words: list[str], separator: str,
                   prefix: list[int]) -> tuple[list[int], list[int]]:
    """(ids, word index of each token: -1 for the prefix) of ``words``, each tokenized on its own (module
    docstring). A word that gives no token has no index in the result."""
    ids, word_of = list(prefix), [-1] * len(prefix)
    for i, word in enumerate(words):
        piece = tokenizer(word if i == 0 else separator + word, add_special_tokens=False)["input_ids"]
        ids += piece
        word_of += [i] * len(piece)
    return ids, word_of


def align_tags(word_of: list[int], tags: list[int], names: list[str]) -> tuple[list[int], list[int]]:
    """(labels, later): per token, the word's tag index at its first sub-token (-100 elsewhere), and at its other
    sub-tokens the tag with B- turned into I- (-100 elsewhere, and where the tag set lacks that I- tag)."""
    inside = {k: names.index(f"I-{name[2:]}") if f"I-{name[2:]}" in names else IGNORE
              for k, name in enumerate(names) if name.startswith("B-")}
    labels, later = [IGNORE] * len(word_of), [IGNORE] * len(word_of)
    seen: set[int] = set()
    for t, w in enumerate(word_of):
        if w < 0:
            continue
        if w not in seen:
            seen.add(w)
            labels[t] = tags[w]
        else:
            later[t] = inside.get(tags[w], tags[w])
    return labels, later


def first_subtokens(word_of: list[int], n_words: int) -> list[int]:
    """The position of each word's first sub-token (-1: the word has none, e.g. cut by truncation)."""
    first = [-1] * n_words
    for t, w in enumerate(word_of):
        if 0 <= w < n_words and first[w] < 0:
            first[w] = t
    return first


__all__ = ["OUTSIDE", "align_tags", "collect_tags", "entity_type", "first_subtokens", "tag_problem",
           "tokenize_words"]
