"""Resize a model for an extended tokenizer and initialise the rows of its new tokens.

Vocabulary expansion (Yamaguchi et al., "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of
Target Language Text?", arXiv:2406.11477, section 3; code gucci-j/lowres-cve). With ``E`` the old rows of one
matrix (input embeddings, or the output layer when untied; each is initialised from itself) and ``t`` a new token:

- ``random``:   e_t ~ N(mu, diag(sigma^2)), mu and sigma the per-dimension mean and std of E's rows.
- ``mean_all``: e_t = mean_i E_i.
- ``mean``:     e_t = mean_{s in S(t)} E_s, S(t) the old tokenizer's pieces of t's string.
- ``merge``:    e_t = (e_l + e_r) / 2 along t's merge ``l + r``, parts resolved recursively (old tokens: E_s),
                so a piece k merges deep weighs 2^-k.
- ``focus``:    FOCUS (Dobler & de Melo, arXiv:2305.14481) with its auxiliary space made here instead of fastText:
                static vectors a_v from ``texts`` encoded with the NEW tokenizer (PPMI over a +-2 token window,
                truncated SVD). Over the old tokens O seen in ``texts``, w = sparsemax(cos(a_t, a_o) / T)
                (T = 0.1, our choice) and e_t = sum_o w_o E_o: a convex combination of the old tokens used most
                like t, so the row stays inside the old rows' hull (unconstrained least-squares weights, as in
                OMP-based transplantation, gave rows of huge norm and a per-word perplexity of 1e23 on SmolLM2).
                Tokens seen fewer than 3 times fall back to ``mean``.
- ``align``:    the paper's recommended init. ``texts`` are encoded with both tokenizers; each occurrence of t is
                aligned to seq, the old tokens that share at least one symbol of the text with it, and
                e_t = sum_seq f(seq | t) mean_{s in seq} E_s,  f(seq | t) = count(t, seq) / count(t).
                Spans are measured in BPE-model space (cumulative token-string lengths), where they are exact;
                character offsets are not (the byte tokens of one UTF-8 character share its offsets). Tokens
                absent from ``texts`` fall back to ``merge``, and those merge cannot resolve to ``random``
                ("Merge initialises first and Random is the fallback"). With :func:`extend_tokenizer`'s
                tokenizers every new encoding coarsens the old one, so each occurrence of t overlaps exactly
                S(t) and align equals ``mean`` on the tokens seen; the weighting matters for a new tokenizer
                whose merges can pre-empt old ones. (gucci-j/lowres-cve keeps containment, not overlap, and
                counts a token once per text; here every occurrence counts.)

Rows past ``len(new_tokenizer)`` (padding to a multiple of 8) are zero; old rows are never written.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np
import torch

from lmadapt.vocab.bpe import VocabError
from lmadapt.vocab.expand import NewToken

INIT_METHODS = ("random", "mean_all", "mean", "merge", "focus", "align")
"""The initialisations :func:`init_new_rows` implements, by name."""

FOCUS_WINDOW, FOCUS_DIM, FOCUS_CONTEXTS, FOCUS_MIN_COUNT, FOCUS_TEMPERATURE = 2, 64, 2048, 3, 0.1
"""FOCUS/OMP settings: co-occurrence window, SVD dimension, context columns kept (most frequent tokens), OMP atoms
per token, and the fewest occurrences a token needs in ``texts`` to get an auxiliary vector."""

ALIGN_BATCH = 1024
"""Texts per ``encode_batch`` call of the ``align`` initialisation."""


@dataclass
class InitReport:
    """What :func:`init_new_rows` did: method, number of new rows per matrix, matrices written (1 when tied), the
    tokens that fell back (to ``mean``: ``focus`` without enough context, ``merge`` with an unknown part; to
    ``merge``: ``align`` for a token absent from the texts) and, of those, the ones that went on to ``random``
    (``align`` for a token that merge cannot resolve either)."""

    method: str
    rows: int
    matrices: int
    fell_back: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = ""
        if self.fell_back:
            extra = f"; {len(self.fell_back)} fell back to {'merge' if self.method == 'align' else 'mean'}"
        if self.random:
            extra += f" ({len(self.random)} of them on to random)"
        return f"{self.method}: {self.rows} new row(s) in {self.matrices} matrix(es){extra}"


def embedding_matrices(model: Any) -> list[torch.nn.Parameter]:
    """The input embedding weight and, unless it is the very same Parameter (tied), the output layer's weight."""
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = getattr(out_layer, "weight", None)
    return [inp] if out is None or out is inp else [inp, out]


def resize_rows(model: Any, rows: int) -> None:
    """Give the input and output matrices ``rows`` rows (never fewer than they have): old rows kept bit for bit,
    added rows (and output-bias entries) zero; ``config.vocab_size`` follows (``resize_token_embeddings`` sets it)."""
    old = model.get_input_embeddings().weight.shape[0]
    if rows <= old:
        return
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for w in embedding_matrices(model):
            w[old:].zero_()
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias[old:].zero_()


def resize_for(model: Any, tokenizer: Any, *, pad_to_multiple_of: int | None = 8) -> int:
    """Give ``model`` at least ``len(tokenizer)`` rows (rounded up to ``pad_to_multiple_of``) with
    :func:`resize_rows`; a model never shrinks. Returns the old row count."""
    old = model.get_input_embeddings().weight.shape[0]
    m = pad_to_multiple_of or 1
    resize_rows(model, max(old, -(-len(tokenizer) // m) * m))
    return old


def subtoken_ids(old_tokenizer: Any, token: str) -> list[int]:
    """The old tokenizer's ids for a BPE-model string (``'Ġund'``, ``'▁und'``), from its BPE model directly.

    This is "tokenize the new token's string with the source tokenizer" done in model space, so a token that is
    only part of a UTF-8 character (which would decode to U+FFFD) and a word-initial ``'▁'`` stay exact."""
    return [t.id for t in old_tokenizer.backend_tokenizer.model.tokenize(token)]


def init_new_rows(model: Any, old_tokenizer: Any, new_tokenizer: Any, new_tokens: Sequence[NewToken],
                  method: str, *, seed: int = 0, texts: Iterable[str] | None = None) -> InitReport:
    """Initialise the input (and, when untied, output) rows of ``new_tokens`` in ``model`` by ``method`` (one of
    :data:`INIT_METHODS`, equations in the module docstring); call :func:`resize_for` first. ``texts`` (target
    text) is needed by ``focus`` and ``align``; ``seed`` drives ``random`` and ``align``'s random fallback."""
    if method not in INIT_METHODS:
        raise VocabError(f"unknown initialisation {method!r}; choose one of {', '.join(INIT_METHODS)}.")
    ids = _new_ids(model, old_tokenizer, new_tokenizer, new_tokens)
    n_old = len(old_tokenizer)
    fell_back: list[str] = []
    plan = None
    if method == "focus":
        if texts is None:
            raise VocabError("the focus initialisation needs target-language texts (texts=...) to learn which old "
                             "tokens each new token is used like.")
        plan = _focus_plan(new_tokenizer, list(texts), ids, n_old)
    elif method == "align":
        if texts is None:
            raise VocabError("the align initialisation needs target-language texts (texts=...; the corpus the "
                             "tokens were learned from) to see which old tokens each new token replaces.")
        plan = _align_plan(old_tokenizer, new_tokenizer, list(texts), ids)
    to_random: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    matrices = embedding_matrices(model)
    with torch.no_grad():
        for w in matrices:
            old = w[:n_old].detach().to(torch.float64)
            if method == "random":
                mu, sd = old.mean(0), old.std(0)
                rows = mu + sd * torch.randn(len(ids), old.shape[1], generator=gen, dtype=torch.float64)
            elif method == "mean_all":
                rows = old.mean(0).expand(len(ids), -1)
            elif method == "mean":
                rows = torch.stack([_mean(old, subtoken_ids(old_tokenizer, t.token)) for t in new_tokens])
            elif method == "merge":
                rows, fell_back = _merge_rows(old, old_tokenizer, new_tokens)
            elif method == "focus":
                rows, fell_back = _focus_rows(old, old_tokenizer, new_tokens, ids, plan)
            else:
                rows, fell_back, to_random = _align_rows(old, old_tokenizer, new_tokens, ids, plan, gen)
            w[ids] = rows.to(w.dtype)
    return InitReport(method, len(ids), len(matrices), fell_back, to_random)


def _new_ids(model: Any, old_tokenizer: Any, new_tokenizer: Any, new_tokens: Sequence[NewToken]) -> list[int]:
    """The new tokenizer's ids of ``new_tokens``, checked to be new (>= len(old)) and inside the resized matrix."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(new_tokenizer):
        raise VocabError(f"the model has {rows} embedding rows but the new tokenizer has {len(new_tokenizer)} "
                         "tokens; call resize_for(model, new_tokenizer) first.")
    vocab = new_tokenizer.get_vocab()
    ids, bad = [], []
    for t in new_tokens:
        i = vocab.get(t.token)
        if i is None or i < len(old_tokenizer):
            bad.append(t.token)
        ids.append(i)
    if bad:
        raise VocabError(f"{len(bad)} token(s) are not new tokens of the new tokenizer (missing, or an old id that "
                         f"must not be overwritten): {bad[:10]}. Pass the tokens extend_tokenizer added.")
    return ids


def _mean(old: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """mean_{s in pieces} E_s."""
    return old[pieces].mean(0)


def _merge_rows(old: torch.Tensor, old_tokenizer: Any, new_tokens: Sequence[NewToken]) -> tuple[torch.Tensor, list[str]]:
    """e_t = (e_l + e_r) / 2 in merge order; a part that is neither an old token nor an earlier new one makes t
    fall back to ``mean`` (the paper's "unresolved" tokens; never the case for learn_new_tokens' output)."""
    old_vocab = {s: i for s, i in old_tokenizer.get_vocab().items() if i < old.shape[0]}
    done: dict[str, torch.Tensor] = {}
    fell_back = []
    for t in new_tokens:
        parts = []
        for p in (t.left, t.right):
            parts.append(old[old_vocab[p]] if p in old_vocab else done.get(p))
        if any(p is None for p in parts) or t.token != t.left + t.right:
            done[t.token] = _mean(old, subtoken_ids(old_tokenizer, t.token))
            fell_back.append(t.token)
        else:
            done[t.token] = (parts[0] + parts[1]) / 2
    return torch.stack([done[t.token] for t in new_tokens]), fell_back


def _focus_rows(old: torch.Tensor, old_tokenizer: Any, new_tokens: Sequence[NewToken], ids: list[int],
                plan: dict[int, tuple[np.ndarray, np.ndarray]] | None) -> tuple[torch.Tensor, list[str]]:
    """e_t = sum_o c_o E_o from the OMP plan, or the ``mean`` row for tokens the plan lacks."""
    rows, fell_back = [], []
    for t, i in zip(new_tokens, ids):
        if plan is not None and i in plan:
            atoms, coef = plan[i]
            rows.append(torch.from_numpy(coef) @ old[torch.from_numpy(atoms)])
        else:
            rows.append(_mean(old, subtoken_ids(old_tokenizer, t.token)))
            fell_back.append(t.token)
    return torch.stack(rows), fell_back


def _focus_plan(new_tokenizer: Any, texts: list[str], new_ids: list[int], n_old: int
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each new id with enough context: (old ids, sparsemax weights) from auxiliary-space cosines."""
    aux, row_of = _aux_vectors(new_tokenizer, texts)
    old_ids = np.array([v for v in row_of if v < n_old], dtype=np.int64)
    if len(old_ids) == 0 or aux.shape[1] == 0:
        return {}
    unit = aux / np.maximum(np.linalg.norm(aux, axis=1, keepdims=True), 1e-12)
    dictionary = unit[[row_of[v] for v in old_ids]]
    plan = {}
    for i in new_ids:
        if i in row_of:
            weights = sparsemax(dictionary @ unit[row_of[i]] / FOCUS_TEMPERATURE)
            support = np.flatnonzero(weights)
            plan[i] = (old_ids[support], weights[support])
    return plan


def _aux_vectors(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, dict[int, int]]:
    """Static token vectors: PPMI of a symmetric +-FOCUS_WINDOW co-occurrence count (rows: tokens seen at least
    FOCUS_MIN_COUNT times; columns: the FOCUS_CONTEXTS most frequent tokens), then U sqrt(S) of a truncated SVD.
    PPMI_ij = max(0, log(C_ij C / (C_i. C_.j)))  (Levy & Goldberg, "Neural word embedding as implicit matrix
    factorization", NeurIPS 2014). Returns the vectors and token id -> row."""
    seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = np.concatenate([np.append(np.asarray(s, dtype=np.int64), -1) for s in seqs]) if seqs else np.zeros(0)
    seg = np.cumsum(flat < 0)
    ids, counts = np.unique(flat[flat >= 0], return_counts=True)
    kept = ids[counts >= FOCUS_MIN_COUNT]
    cols = ids[np.argsort(-counts, kind="stable")][:FOCUS_CONTEXTS]
    if len(kept) < 2 or len(cols) < 2:
        return np.zeros((len(kept), 0)), {int(v): r for r, v in enumerate(kept)}
    size = int(flat.max()) + 1
    row_index, col_index = np.full(size, -1), np.full(size, -1)
    row_index[kept], col_index[cols] = np.arange(len(kept)), np.arange(len(cols))
    cells = []
    for off in range(1, FOCUS_WINDOW + 1):
        a, b = flat[:-off], flat[off:]
        ok = (a >= 0) & (b >= 0) & (seg[:-off] == seg[off:])
        for x, y in ((a[ok], b[ok]), (b[ok], a[ok])):
            r, c = row_index[x], col_index[y]
            keep = (r >= 0) & (c >= 0)
            cells.append(r[keep] * len(cols) + c[keep])
    cell, n = np.unique(np.concatenate(cells), return_counts=True)  # the nonzero C_ij, as a sparse list
    r, c = np.divmod(cell, len(cols))
    row_sum = np.bincount(r, weights=n, minlength=len(kept))
    col_sum = np.bincount(c, weights=n, minlength=len(cols))
    pmi = np.log(n * n.sum() / (row_sum[r] * col_sum[c]))
    ppmi = torch.zeros(len(kept) * len(cols), dtype=torch.float32)
    ppmi[torch.from_numpy(cell)] = torch.from_numpy(np.maximum(pmi, 0.0).astype(np.float32))
    ppmi = ppmi.reshape(len(kept), len(cols))
    u, s, _ = torch.linalg.svd(ppmi, full_matrices=False) if ppmi.numel() <= 4_000_000 else _lowrank(ppmi)
    k = min(FOCUS_DIM, len(s))
    return (u[:, :k] * s[:k].sqrt()).double().numpy(), {int(v): r for r, v in enumerate(kept)}


def _lowrank(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded randomised truncated SVD (Halko et al. 2011) of a large PPMI matrix."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.svd_lowrank(m, q=min(FOCUS_DIM + 8, *m.shape), niter=4)


def sparsemax(z: np.ndarray) -> np.ndarray:
    """Sparsemax (Martins & Astudillo, arXiv:1602.02068): the Euclidean projection of ``z`` onto the probability
    simplex, p_i = max(0, z_i - tau) with tau such that sum p = 1; most entries come out exactly zero."""
    z = np.asarray(z, dtype=np.float64)
    top = np.sort(z)[::-1]
    cumulative = np.cumsum(top)
    k = np.arange(1, len(z) + 1)
    support = k[1 + k * top > cumulative][-1]
    tau = (cumulative[support - 1] - 1) / support
    return np.maximum(z - tau, 0.0)


def _align_rows(old: torch.Tensor, old_tokenizer: Any, new_tokens: Sequence[NewToken], ids: list[int],
                plan: dict[int, tuple[np.ndarray, np.ndarray]], gen: torch.Generator
                ) -> tuple[torch.Tensor, list[str], list[str]]:
    """e_t = sum_o w_o E_o from the align plan; else the ``merge`` row, or a ``random`` row where merge had to
    fall back. Returns the rows, the tokens not in the plan, and those of them that got a random row."""
    merged, unresolved = _merge_rows(old, old_tokenizer, new_tokens)
    unresolved_set = set(unresolved)
    mu, sd = old.mean(0), old.std(0)
    rows, fell_back, to_random = [], [], []
    for k, (t, i) in enumerate(zip(new_tokens, ids)):
        if i in plan:
            atoms, coef = plan[i]
            rows.append(torch.from_numpy(coef) @ old[torch.from_numpy(atoms)])
            continue
        fell_back.append(t.token)
        if t.token in unresolved_set:
            rows.append(mu + sd * torch.randn(old.shape[1], generator=gen, dtype=torch.float64))
            to_random.append(t.token)
        else:
            rows.append(merged[k])
    return torch.stack(rows), fell_back, to_random


def _align_plan(old_tokenizer: Any, new_tokenizer: Any, texts: list[str], new_ids: list[int]
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each new id that occurs in ``texts``: (old ids o, weights w_o) with sum_o w_o E_o equal to
    sum_seq f(seq | t) mean(E[seq]), i.e. w_o = sum_seq f(seq | t) * (times o is in seq) / len(seq)."""
    seen = align_counts(old_tokenizer, new_tokenizer, texts, new_ids)
    plan = {}
    for i, seqs in seen.items():
        total = sum(seqs.values())
        weight: Counter[int] = Counter()
        for seq, n in seqs.items():
            for o in seq:
                weight[o] += n / (total * len(seq))
        atoms = np.fromiter(weight, dtype=np.int64, count=len(weight))
        plan[i] = (atoms, np.fromiter(weight.values(), dtype=np.float64, count=len(weight)))
    return plan


def align_counts(old_tokenizer: Any, new_tokenizer: Any, texts: Sequence[str], new_ids: Iterable[int]
                 ) -> dict[int, Counter[tuple[int, ...]]]:
    """For each of ``new_ids`` that occurs in ``texts`` (encoded without special tokens): how often each sequence
    of old ids overlaps its occurrences, ``{new id: Counter({(old id, ...): count})}``.

    Positions are offsets into the concatenated token strings (BPE-model space: 'Ġ', '▁', one symbol per byte
    of a byte-level token), which both tokenizers share when they differ only in merges; a text whose strings
    differ raises :class:`VocabError`."""
    wanted = set(new_ids)
    counts: dict[int, Counter[tuple[int, ...]]] = {}
    old_backend, new_backend = old_tokenizer.backend_tokenizer, new_tokenizer.backend_tokenizer
    for first in range(0, len(texts), ALIGN_BATCH):
        batch = list(texts[first:first + ALIGN_BATCH])
        olds = old_backend.encode_batch(batch, add_special_tokens=False)
        news = new_backend.encode_batch(batch, add_special_tokens=False)
        for k, (o, n) in enumerate(zip(olds, news)):
            old_ids, old_strings, new_strings = o.ids, o.tokens, n.tokens
            if "".join(old_strings) != "".join(new_strings):
                raise VocabError(
                    f"the text at index {first + k} splits into different strings under the old and the new "
                    "tokenizer, so their tokens cannot be aligned; align needs a new tokenizer that only adds BPE "
                    "merges (the one extend_tokenizer returns), with the same normalizer and pre-tokenizer.")
            ends, start = list(accumulate(map(len, old_strings))), 0
            for i, s in zip(n.ids, new_strings):
                end = start + len(s)
                if i in wanted:  # old tokens j with ends[j] > start and starts[j] < end
                    seq = tuple(old_ids[bisect_right(ends, start): bisect_right(ends, end - 1) + 1])
                    counts.setdefault(i, Counter())[seq] += 1
                start = end
    return counts
