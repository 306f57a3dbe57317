"""MAFT-style vocabulary trimming: keep the tokens a corpus uses, slice the embedding and output rows, remap ids.

Alabi et al., "Adapting Pre-trained Language Models to African Languages via Multilingual Adaptive Fine-Tuning"
(arXiv:2204.06487) shrink XLM-R by removing the vocabulary its target languages never use. For a BPE tokenizer
with vocabulary ``V``, ordered merges ``M`` and a corpus with token counts ``c(t)`` this module keeps

    K = {t : c(t) >= min_count} | S | B | U | closure(...)

``S`` the special and added tokens, ``B`` the byte alphabet (byte-level symbols or ``<0xNN>`` fallback tokens,
so that every text still has a spelling), ``U`` the caller's ``keep_tokens``, and the merge closure: the
characters and every intermediate token that BPE builds on its way to a kept token. BPE is greedy over merge
ranks, and the merges inside a piece ``t`` of a word are exactly those of BPE run on ``t`` alone, so keeping
those and

    M' = [(a, b) in M : a, b, a + b in K]          (same order, so the same priorities)

makes every text whose original pieces all lie in ``K`` encode to the same pieces. New ids are positions in the
ascending list of kept old ids (relative order kept); the model keeps rows ``E' = E[K]``, ``W' = W[K]``.
The paper's exact frequency cut-off is not published (METHODS.md 17c: UNCERTAIN); ``min_count`` is ours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from lmadapt.vocab.bpe import BPEModel, VocabError, added_token_ids, byte_tokens

CONFIG_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
_BATCH = 512


@dataclass
class TrimPlan:
    """Which token ids a trim keeps, and why. ``kept_ids`` ascending; new id = position (``id_map``)."""

    kept_ids: list[int]
    id_map: dict[int, int]
    counts: dict[int, int]  # old id -> occurrences in the texts
    tokenizer_size: int  # len(tokenizer) of the tokenizer the plan was made for
    id_space: int  # largest old id + 1 (the embedding rows the model needs at least)
    corpus_tokens: int
    min_count: int
    kept_by_reason: dict[str, int] = field(default_factory=dict)
    merges_before: int = 0
    merges_after: int = 0

    def covered_tokens(self) -> int:
        """Corpus token occurrences whose token is kept."""
        return sum(n for i, n in self.counts.items() if i in self.id_map)

    def report(self, model: Any = None, *, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
        """Tokens before/after, corpus coverage and, given the (untrimmed) model, embedding parameters and bytes.

        Embedding parameters count the input matrix and the output matrix, a tied pair once.
        """
        after = len(self.kept_ids)
        out: dict[str, Any] = {
            "tokens_before": self.tokenizer_size, "tokens_after": after,
            "tokens_removed": self.tokenizer_size - after, "kept_by_reason": dict(self.kept_by_reason),
            "merges_before": self.merges_before, "merges_after": self.merges_after,
            "corpus_tokens": self.corpus_tokens, "min_count": self.min_count,
            "corpus_coverage": self.covered_tokens() / self.corpus_tokens if self.corpus_tokens else 0.0,
        }
        if model is None:
            return out
        inp, outp, tied = _embedding_weights(model)
        rows_after = _padded(after, pad_to_multiple_of)
        n_mats = 1 if tied or outp is None else 2
        dim = inp.shape[1]
        before_p = inp.shape[0] * dim + (0 if n_mats == 1 else outp.shape[0] * outp.shape[1])
        after_p = rows_after * dim * n_mats
        total = sum(p.numel() for p in model.parameters())
        out.update({
            "embedding_rows_before": inp.shape[0], "embedding_rows_after": rows_after, "tied": tied,
            "embedding_params_before": before_p, "embedding_params_after": after_p,
            "params_saved": before_p - after_p, "model_params_before": total,
            "model_params_after": total - (before_p - after_p), "dtype": str(inp.dtype).replace("torch.", ""),
            "bytes_saved": (before_p - after_p) * inp.element_size(),
        })
        return out


def plan_trim(tokenizer: Any, texts: Iterable[str], *, min_count: int = 1,
              keep_tokens: Iterable[str] = ()) -> TrimPlan:
    """Plan a MAFT-style trim (Alabi et al., arXiv:2204.06487): ``K = {c(t) >= min_count} | S | B | U | closure``.

    ``texts`` are encoded without special tokens and counted; see the module docstring for the closure.
    """
    if min_count < 1:
        raise VocabError(f"min_count must be at least 1 (got {min_count}); 1 keeps every token the texts use.")
    bpe = BPEModel.from_tokenizer(tokenizer)
    _check_bpe_options(bpe)
    counts, total = _count_tokens(tokenizer, texts)
    if total == 0:
        raise VocabError("the texts yield no tokens (empty corpus): pass the text of the languages to keep, "
                         "e.g. a few thousand sentences or more.")
    vocab_ids = tokenizer.get_vocab()
    reasons: dict[str, set[int]] = {
        "used": {i for i, n in counts.items() if n >= min_count},
        "special": set(added_token_ids(tokenizer)) | {i for i in tokenizer.all_special_ids if i is not None},
        "byte_alphabet": {vocab_ids[t] for t in byte_tokens(tokenizer) if t in vocab_ids},
        "spacing": {vocab_ids[t] for t in _spacing_symbols(bpe.data) if t in vocab_ids},
        "keep_tokens": _ids_of(tokenizer, keep_tokens, vocab_ids),
    }
    kept = set().union(*reasons.values())
    id_to_tok = {i: t for t, i in bpe.vocab.items()}
    closure = _merge_closure([id_to_tok[i] for i in kept if i in id_to_tok and i not in reasons["special"]], bpe)
    reasons["merge_closure"] = {bpe.vocab[t] for t in closure} - kept
    kept |= reasons["merge_closure"]
    kept_ids = sorted(kept)
    kept_strs = {id_to_tok[i] for i in kept_ids if i in id_to_tok}
    merges_after = sum(1 for a, b in bpe.merges if a in kept_strs and b in kept_strs and a + b in kept_strs)
    # each kept token is counted once, under the first reason that keeps it
    first = {name: len(ids - set().union(*(reasons[o] for o in list(reasons)[:k])))
             for k, (name, ids) in enumerate(reasons.items())}
    return TrimPlan(
        kept_ids=kept_ids, id_map={old: new for new, old in enumerate(kept_ids)}, counts=dict(counts),
        tokenizer_size=len(tokenizer), id_space=max(vocab_ids.values()) + 1, corpus_tokens=total,
        min_count=min_count, kept_by_reason=first, merges_before=len(bpe.merges), merges_after=merges_after,
    )


def trim_tokenizer(tokenizer: Any, plan: TrimPlan) -> Any:
    """The tokenizer with only the kept tokens (ids remapped by ``plan.id_map``) and the merges ``M'``."""
    _check_plan(plan, tokenizer)
    bpe = BPEModel.from_tokenizer(tokenizer)
    bpe.vocab = {t: plan.id_map[i] for t, i in bpe.vocab.items() if i in plan.id_map}
    bpe.merges = [(a, b) for a, b in bpe.merges if a in bpe.vocab and b in bpe.vocab and a + b in bpe.vocab]
    return bpe.to_tokenizer(tokenizer, id_map=plan.id_map)


@torch.no_grad()
def trim_model(model: Any, plan: TrimPlan, *, pad_to_multiple_of: int | None = None) -> Any:
    """Keep rows ``E[K]`` of the input embeddings and ``W[K]`` of the output layer (tied or not), in place.

    Rows added by ``pad_to_multiple_of`` are zero. ``config.vocab_size`` and the special token ids of
    ``model.config`` and ``model.generation_config`` (bos/eos/pad, lists too) are remapped through the plan.
    """
    inp, outp, tied = _embedding_weights(model)
    if inp.shape[0] < plan.id_space:
        raise VocabError(f"the model has {inp.shape[0]} embedding rows but the tokenizer uses ids up to "
                         f"{plan.id_space - 1}; this tokenizer does not belong to this model. Load the model's "
                         "own tokenizer (or resize the model to the tokenizer first).")
    configs = _token_configs(model)
    _check_config_ids(configs, plan)
    idx = torch.tensor(plan.kept_ids, dtype=torch.long, device=inp.device)
    rows_in = inp.index_select(0, idx).clone()
    rows_out = None if tied or outp is None else outp.index_select(0, idx.to(outp.device)).clone()
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    rows_bias = None if bias is None else bias.index_select(0, idx.to(bias.device)).clone()
    pad_idx = getattr(model.get_input_embeddings(), "padding_idx", None)
    n = len(plan.kept_ids)
    model.resize_token_embeddings(n, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    emb = model.get_input_embeddings()
    _write_rows(emb.weight, rows_in)
    emb.padding_idx = plan.id_map.get(pad_idx) if pad_idx is not None else None
    head = model.get_output_embeddings()
    if rows_out is not None:
        _write_rows(head.weight, rows_out)
    if rows_bias is not None and getattr(head, "bias", None) is not None:
        _write_rows(head.bias, rows_bias)
    for cfg in configs:
        for key in CONFIG_TOKEN_KEYS:
            value = getattr(cfg, key, None)
            if value is not None:
                setattr(cfg, key, [plan.id_map[v] for v in value] if isinstance(value, list) else plan.id_map[value])
    model.config.get_text_config().vocab_size = emb.weight.shape[0]
    return model


def trim(model: Any, tokenizer: Any, texts: Iterable[str], *, min_count: int = 1, keep_tokens: Iterable[str] = (),
         pad_to_multiple_of: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Plan and apply a MAFT-style trim (arXiv:2204.06487); returns ``(model, tokenizer, report)``.

    The model's own special token ids (config and generation config) are kept as well.
    """
    id_space = max(tokenizer.get_vocab().values()) + 1
    extra = [tokenizer.convert_ids_to_tokens(i) for i in _config_ids(model, id_space)]
    plan = plan_trim(tokenizer, texts, min_count=min_count, keep_tokens=[*keep_tokens, *extra])
    report = plan.report(model, pad_to_multiple_of=pad_to_multiple_of)
    new_tok = trim_tokenizer(tokenizer, plan)
    return trim_model(model, plan, pad_to_multiple_of=pad_to_multiple_of), new_tok, report


# ---------------------------------------------------------------------------------------------- helpers


def _merge_path(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The characters of ``token`` and the tokens BPE builds from them, lowest rank first and leftmost on ties (as
    ``tokenizers`` does); empty when BPE does not reach ``token`` itself (then no merge ever produces it)."""
    symbols = list(token)
    made: list[str] = list(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        made.append(symbols[i])
    return made if symbols == [token] else []


def _merge_closure(tokens: Iterable[str], bpe: BPEModel) -> set[str]:
    """Every starting character and intermediate token on the BPE merge paths of ``tokens`` (sub-paths included)."""
    ranks = {pair: r for r, pair in enumerate(bpe.merges)}
    out: set[str] = set()
    for tok in tokens:
        if len(tok) > 1:
            out.update(_merge_path(tok, ranks))
    return {t for t in out if t in bpe.vocab}


def _check_bpe_options(bpe: BPEModel) -> None:
    """Refuse BPE variants whose merge paths this module does not model."""
    model = bpe.data["model"]
    odd = {k: model.get(k) for k in ("continuing_subword_prefix", "end_of_word_suffix", "dropout") if model.get(k)}
    if odd:
        raise VocabError(f"this BPE tokenizer sets {odd}; trimming supports BPE without subword prefixes, suffixes "
                         "or dropout (GPT-2/Llama/Gemma style). Remove dropout, or trim another tokenizer.")


def _count_tokens(tokenizer: Any, texts: Iterable[str]) -> tuple[Counter[int], int]:
    """Token id counts over ``texts`` (no special tokens added) and their total."""
    counts: Counter[int] = Counter()
    backend = tokenizer.backend_tokenizer
    it: Iterator[str] = iter(texts if not isinstance(texts, str) else [texts])
    while batch := list(islice(it, _BATCH)):
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            counts.update(enc.ids)
    return counts, sum(counts.values())


def _spacing_symbols(data: dict[str, Any]) -> set[str]:
    """Whitespace stand-ins (``▁``) that a normalizer/pre-tokenizer writes and the decoder turns back into spaces;
    spelling them in bytes would decode them literally, so they are kept."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Replace" and isinstance(node.get("content"), str):
                found.add(node["content"])
            elif kind == "Metaspace":
                found.add(node.get("replacement", "\u2581"))
            elif kind == "Prepend":
                found.add(node.get("prepend", ""))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk([data.get("normalizer"), data.get("pre_tokenizer")])
    return {s for s in found if s}


def _ids_of(tokenizer: Any, tokens: Iterable[str], vocab_ids: dict[str, int]) -> set[int]:
    """Ids of ``keep_tokens``; unknown ones are an error that lists them."""
    tokens = list(tokens)
    missing = [t for t in tokens if t not in vocab_ids]
    if missing:
        raise VocabError(f"keep_tokens has {len(missing)} string(s) that are not tokens of this tokenizer: "
                         f"{missing[:10]}. Give token strings as the vocabulary spells them "
                         f"(tokenizer.convert_ids_to_tokens(...); byte-level BPE writes a space as 'Ġ').")
    return {vocab_ids[t] for t in tokens}


def _check_plan(plan: TrimPlan, tokenizer: Any) -> None:
    """Refuse a plan that was made for another tokenizer or that drops special, added or byte tokens."""
    if plan.tokenizer_size != len(tokenizer):
        raise VocabError(f"the plan was made for a tokenizer with {plan.tokenizer_size} tokens, this one has "
                         f"{len(tokenizer)}; make the plan with plan_trim(this tokenizer, texts).")
    if plan.kept_ids != sorted(set(plan.kept_ids)) or plan.id_map != {o: n for n, o in enumerate(plan.kept_ids)}:
        raise VocabError("plan.kept_ids must be ascending and unique and plan.id_map must map each to its "
                         "position; build plans with plan_trim().")
    special = set(added_token_ids(tokenizer)) | {i for i in tokenizer.all_special_ids if i is not None}
    vocab_ids = tokenizer.get_vocab()
    lost = sorted(i for i in special if i not in plan.id_map)
    if lost:
        names = tokenizer.convert_ids_to_tokens(lost[:10])
        raise VocabError(f"the trim would drop {len(lost)} special/added token(s) {names} (ids {lost[:10]}); "
                         "special tokens (bos/eos/pad/unk, chat markers) must always be kept: keep them in the plan.")
    lost_b = sorted(t for t in byte_tokens(tokenizer) if t in vocab_ids and vocab_ids[t] not in plan.id_map)
    if lost_b:
        raise VocabError(f"the trim would drop {len(lost_b)} byte token(s) (e.g. {lost_b[:5]}), so some text "
                         "would have no spelling; keep the byte alphabet in the plan.")


def _embedding_weights(model: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Input and output weight matrices and whether they are one tied Parameter."""
    inp = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    outp = None if head is None else head.weight
    return inp, outp, outp is None or outp is inp or outp.data_ptr() == inp.data_ptr()


def _token_configs(model: Any) -> list[Any]:
    """The configs that carry special token ids: config, its text config, generation config."""
    cfgs = [model.config]
    text = model.config.get_text_config()
    if text is not model.config:
        cfgs.append(text)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        cfgs.append(gen)
    return cfgs


def _config_ids(model: Any, limit: int) -> list[int]:
    """Special token ids named in the model's configs (those below ``limit``, i.e. tokenizer ids)."""
    ids: set[int] = set()
    for cfg in _token_configs(model):
        for key in CONFIG_TOKEN_KEYS:
            value = getattr(cfg, key, None)
            ids.update(v for v in (value if isinstance(value, list) else [value]) if v is not None and v < limit)
    return sorted(ids)


def _check_config_ids(configs: list[Any], plan: TrimPlan) -> None:
    """Every special token id the model's configs name must survive the trim."""
    lost = []
    for cfg in configs:
        for key in CONFIG_TOKEN_KEYS:
            value = getattr(cfg, key, None)
            lost += [f"{type(cfg).__name__}.{key}={v}" for v in (value if isinstance(value, list) else [value])
                     if v is not None and v not in plan.id_map]
    if lost:
        raise VocabError(f"the trim would drop special token ids the model uses: {lost}; keep these tokens "
                         "(plan_trim(..., keep_tokens=[...]) or use trim(), which keeps them).")


def _write_rows(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """First ``len(rows)`` rows from ``rows``, padding rows past them zero."""
    weight.data[: rows.shape[0]] = rows.to(weight.device, weight.dtype)
    weight.data[rows.shape[0]:] = 0


def _padded(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (as resize_token_embeddings does)."""
    return n if not multiple else -(-n // multiple) * multiple
