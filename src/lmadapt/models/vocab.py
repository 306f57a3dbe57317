"""Vocabulary utilities: whether two tokenizers agree, and the vocabulary width several models share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
)

from lmadapt.errors import LmadaptError


def vocabulary_mismatch(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase) -> str | None:
    """None when both tokenizers map every id to the same token; else where they differ, as a phrase:
    ``"in 2 token id(s), e.g. id 17: '2' vs '3', id 18: '3' vs '2'"`` (at most five ids shown)."""
    ours = {i: t for t, i in tokenizer.get_vocab().items()}
    theirs = {i: t for t, i in other.get_vocab().items()}
    differ = sorted(i for i in ours.keys() | theirs.keys() if ours.get(i) != theirs.get(i))
    if not differ:
        return None
    show = lambda token: "(none)" if token is None else repr(token)  # noqa: E731
    shown = ", ".join(f"id {i}: {show(ours.get(i))} vs {show(theirs.get(i))}" for i in differ[:5])
    return f"in {len(differ)} token id(s), e.g. {shown}"


def special_tokens_by_id(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def check_vocabularies(tokenizer: PreTrainedTokenizerBase, others: Mapping[str, PreTrainedTokenizerBase]) -> None:
    """Raise unless every tokenizer of ``others`` maps the same ids to the same tokens, with the same special
    tokens, as ``tokenizer``; the message counts the differing ids and shows the first few."""
    ref_special = special_tokens_by_id(tokenizer)
    problems = []
    for name, other in others.items():
        mismatch = vocabulary_mismatch(tokenizer, other)
        if mismatch:
            problems.append(f"the {name} tokenizer differs from the base model's {mismatch}")
        elif special_tokens_by_id(other) != ref_special:
            problems.append(f"the {name} tokenizer marks other tokens as special: base "
                            f"{sorted(ref_special.values())} vs {sorted(special_tokens_by_id(other).values())}")
    if problems:
        raise LmadaptError("; ".join(problems) + ". Steering adds per-token scores, so every model must share "
                           "one vocabulary (same model family); lmadapt does no cross-vocabulary mapping")


def logit_width(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def common_vocab_size(tokenizer: PreTrainedTokenizerBase, models: Sequence[nn.Module]) -> int:
    """The number of logit columns every model shares: the narrowest model's width, as long as it covers all
    ``len(tokenizer)`` tokens (wider models only add padding rows, which are dropped)."""
    n, widths = len(tokenizer), [logit_width(m) for m in models]
    short = sorted({w for w in widths if w < n})
    if short:
        raise LmadaptError(f"a model has only {short[0]} output rows but the tokenizer has {n} tokens, so it "
                           f"cannot score tokens {short[0]}..{n - 1}; all models must share one vocabulary")
    return min(widths)


def check_same_tokenizer(base: PreTrainedTokenizerBase, value: PreTrainedTokenizerBase, *, base_name: str = "base",
                         value_name: str = "value backbone") -> None:
    """Refuse two tokenizers with different vocabularies: the value model reads the base model's token ids."""
    mismatch = vocabulary_mismatch(base, value)
    if mismatch:
        raise LmadaptError(f"the tokenizer of {value_name} differs from that of {base_name} ({len(base.get_vocab())} "
                           f"vs {len(value.get_vocab())} entries; it differs {mismatch}). The value model reads the base "
                           f"model's token ids, so both need one vocabulary: pick a value backbone of the same "
                           f"family (e.g. TinyLlama for Llama-2)")
