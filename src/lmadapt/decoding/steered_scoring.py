"""Teacher-forced scoring under steering: log-probabilities of given continuations under proxy-tuning / EFT.

The scoring counterpart of :func:`lmadapt.decoding.steering.steered_generate` (the same per-token renormalised
scores, ``log softmax(sum_j w_j log pi_j)``), for classification by label likelihood through proxy-tuning
(Liu et al., arXiv:2401.08565) and EFT (Mitchell et al., arXiv:2310.12962). Each term's model runs the context
once and every continuation from its KV cache (:func:`lmadapt.decoding.scoring.continuation_logits`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.scoring import continuation_logits
from lmadapt.decoding.steering import ModelTerm, eval_all, prepare_terms
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import adapters_disabled, model_device
from lmadapt.models.vocab import logit_width


def proxy_score_continuations(terms: Sequence[ModelTerm], context: list[int], continuations: list[list[int]], *,
                              expert_context: list[int] | None = None,
                              vocab_size: int | None = None) -> list[torch.Tensor]:
    """Per-token ``log softmax(sum_j w_j log pi_j)(c_t | context, c_<t)`` of each continuation (float64, CPU).

    Teacher-forced, the same per-token renormalised scores as the decoder's; the counterpart of
    :func:`lmadapt.decoding.scoring.score_continuations` for steered models. Each term's model runs the context
    once and all continuations from its KV cache (:func:`continuation_logprobs`).
    """
    per_term = continuation_logprobs(terms, context, continuations, expert_context=expert_context,
                                     vocab_size=vocab_size)
    return combine_continuation_logprobs(per_term, [t.weight for t in terms], continuations)


def continuation_logprobs(terms: Sequence[ModelTerm], context: list[int], continuations: list[list[int]], *,
                          expert_context: list[int] | None = None,
                          vocab_size: int | None = None) -> list[torch.Tensor]:
    """For each term, the (continuations, longest, vocab) fp32 log-probabilities its model gives at every
    continuation position (position t predicts token t), unweighted, on the first term's device.

    They do not depend on the weights: :func:`combine_continuation_logprobs` turns them into steered scores
    for any weights, so several values of beta cost one pass of each model.
    """
    if not context or (expert_context is not None and not expert_context):
        raise LmadaptError("proxy_score_continuations: the context is empty; a first token needs something to follow")
    if not continuations or any(not c for c in continuations):
        raise LmadaptError("proxy_score_continuations: a continuation tokenizes to no tokens")
    vocab = vocab_size or min(logit_width(t.model) for t in terms)
    device = model_device(terms[0].model)
    with eval_all([t.model for t in terms]):
        return [_term_continuation_logprobs(t, expert_context if t.expert_prompt and expert_context is not None
                                            else context, continuations, vocab).to(device) for t in terms]


def combine_continuation_logprobs(per_term: Sequence[torch.Tensor], weights: Sequence[float],
                                  continuations: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation under ``softmax(sum_j weights_j per_term_j)`` (float64, CPU)."""
    total = sum(float(w) * lp.double() for w, lp in zip(weights, per_term))
    logp = total.log_softmax(-1).cpu()
    return [logp[i, :len(c)].gather(1, torch.tensor(c)[:, None]).squeeze(1) for i, c in enumerate(continuations)]


def _term_continuation_logprobs(term: ModelTerm, context: list[int], continuations: list[list[int]],
                                vocab: int) -> torch.Tensor:
    """(continuations, longest, vocab) fp32 log-probabilities of one term's model, from
    :func:`lmadapt.decoding.scoring.continuation_logits` (the context once, the continuations from its cache)."""
    with adapters_disabled(term.model) if term.adapters_off else contextlib.nullcontext():
        logits = continuation_logits(term.model, context, continuations)
    if logits is None:
        raise LmadaptError(f"proxy scoring needs a KV cache that can be repeated per continuation; "
                           f"{type(term.model).__name__}'s cannot")
    return logits[..., :vocab].float().log_softmax(-1)


def proxy_logprobs(base: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   continuations: list[str], *, expert: nn.Module | None = None,
                   anti_expert: nn.Module | None = None, beta: float = 1.0,
                   experts: Sequence[tuple[nn.Module, nn.Module | None, float]] = (),
                   expert_tokenizer: PreTrainedTokenizerBase | None = None, chat: bool = False,
                   expert_chat: bool | None = None, system_prompt: str | None = None) -> list[list[float]]:
    """For each prompt, the proxy-tuned log-likelihood ``sum_t log p(c_t | x, c_<t)`` of every continuation.

    Classification by label likelihood through proxy-tuning (arXiv:2401.08565) / EFT (arXiv:2310.12962):
    ``argmax`` over the continuations of a prompt's row. Continuations are tokenized as written, without
    special tokens, as :mod:`lmadapt.evaluation` does.
    """
    terms, vocab, encoded, expert_encoded = prepare_terms(
        base, tokenizer, prompts, dict(expert=expert, anti_expert=anti_expert, beta=beta, experts=experts),
        expert_tokenizer, chat, expert_chat, system_prompt)
    cont = [list(tokenizer(c, add_special_tokens=False).input_ids) for c in continuations]
    return [[s.sum().item() for s in proxy_score_continuations(
        terms, encoded[i], cont, vocab_size=vocab,
        expert_context=None if expert_encoded is None else expert_encoded[i])] for i in range(len(prompts))]
