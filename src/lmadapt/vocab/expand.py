"""Learn target-language tokens and add them to a BPE tokenizer so that old text keeps its encoding.

Vocabulary expansion (Yamaguchi et al., "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of
Target Language Text?", arXiv:2406.11477; code gucci-j/lowres-cve). New tokens are learned by BPE training
*continued* from the tokenizer's own encoding of the target text: each word starts as its current token
sequence, and step k merges the most frequent adjacent pair ``(l, r)`` whose concatenation the vocabulary lacks,

    (l_k, r_k) = argmax_{(l, r): l + r not in V_k} count_k(l, r),    V_{k+1} = V_k + {l_k r_k}.

:func:`extend_tokenizer` appends token k at id ``len(tokenizer) + k`` and its merge at the END of the merge list.
BPE applies merges lowest rank first and no old merge involves a new token, so every word first reaches its
old encoding and only then the new merges apply: a new encoding is a coarsening of the old one, old ids keep
their strings, and text in which no new merge fires encodes to exactly the old ids.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from transformers import PreTrainedTokenizerFast

from lmadapt.progress import Progress
from lmadapt.vocab.bpe import BYTE_FALLBACK_TOKENS, SUPPORTED, BPEModel, VocabError

Pair = tuple[str, str]
_METASPACE_WORDS = re.compile("[^\u2581]+|\u2581+[^\u2581]*")


@dataclass(frozen=True)
class NewToken:
    """A learned token: its BPE-model string (byte-level ``'Ġund'`` or SentencePiece ``'▁und'``), the two
    tokens it merges, and how often that pair occurred in the corpus when it was merged."""

    token: str
    left: str
    right: str
    frequency: int


def learn_new_tokens(tokenizer: Any, texts: Iterable[str], n: int, *, min_frequency: int = 2,
                     progress: bool | None = False) -> list[NewToken]:
    """The ``n`` tokens that continued BPE training on ``texts`` merges first (module docstring), in merge order.

    Words come from the tokenizer's own normalizer and pre-tokenizer, never across added/special tokens.
    Raises :class:`VocabError` when ``n < 1``, when the tokenizer cannot be extended, when the corpus yields no
    new token, or when it yields fewer than ``n`` with pair frequency >= ``min_frequency``.
    """
    if n < 1:
        raise VocabError(f"the number of new tokens must be at least 1, got n={n}.")
    if min_frequency < 1:
        raise VocabError(f"min_frequency must be at least 1, got {min_frequency}.")
    bpe = check_extendable(tokenizer)
    counts = Counter(_words(tokenizer, texts, metaspace=bpe.byte_fallback or _uses_metaspace(bpe)))
    if not counts:
        raise VocabError("the corpus has no text (every text is empty or only special tokens); give target-"
                         "language text to learn new tokens from.")
    known = set(bpe.vocab) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    model = tokenizer.backend_tokenizer.model
    words = [[t.value for t in model.tokenize(w)] for w in counts]
    trainer = _ContinuedBPE(words, list(counts.values()), known)
    found = trainer.run(n, min_frequency, progress)
    if not found:
        raise VocabError(
            f"the corpus ({sum(counts.values())} words, {len(counts)} distinct) yields no new token: "
            + trainer.why_stopped(min_frequency)
            + ". Give more target-language text, or lower min_frequency."
        )
    if len(found) < n:
        raise VocabError(
            f"asked for n={n} new tokens but the corpus ({sum(counts.values())} words) yields only {len(found)} "
            f"with min_frequency={min_frequency} ({trainer.why_stopped(min_frequency)}). Ask for n={len(found)} "
            "or fewer, lower min_frequency, or give more text."
        )
    return found


def extend_tokenizer(tokenizer: Any, new_tokens: Iterable[NewToken]) -> PreTrainedTokenizerFast:
    """A copy of ``tokenizer`` with ``new_tokens`` at ids ``len(tokenizer), len(tokenizer) + 1, ...`` (after every
    existing id, added tokens included) and their merges appended at the lowest priority, in the given order."""
    bpe = check_extendable(tokenizer)
    new_tokens = list(new_tokens)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    ids = list(bpe.vocab.values()) + list(tokenizer.added_tokens_decoder)
    next_id = max([len(tokenizer), *(i + 1 for i in ids)])
    problems = []
    for t in new_tokens:
        if t.token != t.left + t.right:
            problems.append(f"{t.token!r} is not {t.left!r} + {t.right!r}")
        elif t.token in bpe.vocab or t.token in added:
            problems.append(f"{t.token!r} is already a token")
        elif t.left not in bpe.vocab or t.right not in bpe.vocab:
            problems.append(f"{t.token!r}: its parts {t.left!r}, {t.right!r} must be tokens (old or earlier new)")
        else:
            bpe.vocab[t.token] = next_id
            next_id += 1
            bpe.merges.append((t.left, t.right))
    if problems:
        raise VocabError(f"{len(problems)} new token(s) cannot be added: " + "; ".join(problems[:10])
                         + ". Pass the list that learn_new_tokens returned for this tokenizer, in its order.")
    return bpe.to_tokenizer(tokenizer)


def check_extendable(tokenizer: Any) -> BPEModel:
    """The BPE model of ``tokenizer``, or :class:`VocabError` naming why it cannot take new merges."""
    bpe = BPEModel.from_tokenizer(tokenizer)
    model = bpe.data["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise VocabError(
            f"{type(tokenizer).__name__} is a BPE with a continuing-subword prefix or end-of-word suffix "
            f"({model.get('continuing_subword_prefix')!r}, {model.get('end_of_word_suffix')!r}), which "
            f"lmadapt does not extend. Supported: {SUPPORTED}."
        )
    if model.get("dropout"):
        raise VocabError(f"the tokenizer has BPE dropout {model['dropout']}; its encoding is random, so new "
                         "merges cannot be learned from it. Load it without dropout.")
    return bpe


def _uses_metaspace(bpe: BPEModel) -> bool:
    """True when words are marked with '▁' (SentencePiece style) rather than byte-level 'Ġ'."""
    return "\u2581" in bpe.vocab and "\u0120" not in bpe.vocab


def _words(tokenizer: Any, texts: Iterable[str], metaspace: bool) -> Iterator[str]:
    """Pre-tokenized words of ``texts`` in BPE-model space, split around added tokens first.

    SentencePiece-style tokenizers often do not pre-split (``Metaspace(split=False)`` or no pre-tokenizer); their
    text is cut before each run of '▁' so that no learned token spans two words, as SentencePiece itself does.
    """
    backend = tokenizer.backend_tokenizer
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
    splitter = re.compile("|".join(map(re.escape, specials))) if specials else None
    norm, pre = backend.normalizer, backend.pre_tokenizer
    for text in texts:
        for segment in splitter.split(text) if splitter else [text]:
            if not segment:
                continue
            if norm is not None:
                segment = norm.normalize_str(segment)
            pieces = [p for p, _ in pre.pre_tokenize_str(segment)] if pre is not None else [segment]
            for piece in pieces:
                yield from _METASPACE_WORDS.findall(piece) if metaspace else [piece]


class _ContinuedBPE:
    """BPE merges over a fixed word list with incremental pair counts (Sennrich et al., arXiv:1508.07909).

    ``pair_count[p]`` is the weighted count of pair ``p``; ``where[p]`` the words that contain it. A max-heap of
    ``(-count, left, right)`` with lazy deletion picks the best pair; ties go to the lexicographically smallest.
    """

    def __init__(self, words: list[list[str]], counts: list[int], known: set[str]) -> None:
        self.words, self.counts, self.known = words, counts, known
        self.fallback = set(BYTE_FALLBACK_TOKENS)
        self.pair_count: Counter[Pair] = Counter()
        self.where: dict[Pair, set[int]] = {}
        for i, w in enumerate(words):
            for p in pairwise(w):
                if self._allowed(p):
                    self.pair_count[p] += counts[i]
                    self.where.setdefault(p, set()).add(i)
        self.heap = [(-c, a, b) for (a, b), c in self.pair_count.items()]
        heapq.heapify(self.heap)

    def _allowed(self, p: Pair) -> bool:
        """A pair may merge unless its result exists already or it joins byte-fallback pieces ('<0xC3>')."""
        return p[0] + p[1] not in self.known and p[0] not in self.fallback and p[1] not in self.fallback

    def best(self) -> tuple[Pair, int] | None:
        """The most frequent allowed pair and its count, or None when none is left."""
        while self.heap:
            negc, a, b = self.heap[0]
            if self.pair_count.get((a, b)) == -negc and self._allowed((a, b)):
                return (a, b), -negc
            heapq.heappop(self.heap)
        return None

    def run(self, n: int, min_frequency: int, progress: bool | None) -> list[NewToken]:
        """Up to ``n`` merges, stopping early when the best pair occurs fewer than ``min_frequency`` times."""
        found: list[NewToken] = []
        with Progress(n, "learning new tokens", "merge", enabled=progress) as bar:
            while len(found) < n:
                top = self.best()
                if top is None or top[1] < min_frequency:
                    break
                (a, b), c = top
                self._merge(a, b)
                found.append(NewToken(a + b, a, b, c))
                bar.update()
        return found

    def _merge(self, a: str, b: str) -> None:
        """Replace every (a, b) in every word containing it (left to right) and update the pair counts."""
        ab = a + b
        self.known.add(ab)
        changed: set[Pair] = set()
        for i in self.where.pop((a, b), ()):
            w, c = self.words[i], self.counts[i]
            before = Counter(p for p in pairwise(w) if self._allowed(p))
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(ab)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            self.words[i] = out
            after = Counter(p for p in pairwise(out) if self._allowed(p))
            for p in before.keys() | after.keys():
                d = after[p] - before[p]
                if d:
                    self.pair_count[p] += d * c
                    changed.add(p)
                if p in after and p not in before:
                    self.where.setdefault(p, set()).add(i)
                elif p not in after and p in before and p in self.where:
                    self.where[p].discard(i)
        self.pair_count.pop((a, b), None)
        for p in changed:
            if self.pair_count.get(p, 0) > 0:
                heapq.heappush(self.heap, (-self.pair_count[p], *p))
            else:
                self.pair_count.pop(p, None)

    def why_stopped(self, min_frequency: int) -> str:
        """Why no further token is learned, with the counts."""
        top = self.best()
        if top is None:
            return "every adjacent token pair in it is already a token of the vocabulary"
        (a, b), c = top
        return (f"the most frequent new pair left, {a!r} + {b!r}, occurs {c} time(s), fewer than "
                f"min_frequency={min_frequency}")
