"""Ranking candidates by log-likelihood: the scoring rule shared by multiple choice and classification.

The prompt becomes token ids as in :func:`lmadapt.decoding.generation.encode_prompt` (as written, or a chat
turn with the assistant's turn opened); each candidate (choice or label) is tokenized *on its own, as
written, without special tokens*, and appended. Its score is the log-likelihood of those tokens given the
prompt (computed by :func:`lmadapt.decoding.scoring.score_continuations`)::

    log p(c | x) = sum_t log softmax(f(x ++ c_<t))[c_t]

So write candidates the way the model would continue the prompt: ``" sport"`` after ``"Topic:"`` for
byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen); ``"sport"`` with ``chat=True`` (the start of
the assistant's turn); without the space for SentencePiece tokenizers (Llama 2, Mistral), which add one.
A candidate that is a token-prefix of another always wins the summed score over it (the longer one
pays for its extra tokens).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import encode_prompt
from lmadapt.decoding.scoring import Strategy, score_continuations


def log_likelihoods(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, candidates: list[list[int]],
                    *, chat: bool = False, system_prompt: str | None = None,
                    strategy: Strategy = "auto") -> tuple[list[float], list[float]]:
    """(summed, mean per token) log-likelihood of each candidate's ids (from
    :func:`~lmadapt.evaluation.examples.candidate_ids`) after ``prompt``."""
    context = encode_prompt(tokenizer, prompt, chat=chat, system_prompt=system_prompt)
    scores = score_continuations(model, context, candidates, strategy=strategy)
    return [s.sum().item() for s in scores], [s.mean().item() for s in scores]


def argmax(values: list[float]) -> int:
    """Index of the largest value; the first of equal ones."""
    return max(range(len(values)), key=values.__getitem__)
