"""Decoding-time steering: proxy-tuning / EFT up-scaling and VAS value-guided sampling, in one loop.

Every model involved steps in lockstep, one token at a time, each with its own prompt ids, left padding,
attention mask, position ids and KV cache; the token chosen from the combined scores is appended to every
stream. The combined next-token scores are built from *terms*:

- Proxy-tuning ("Tuning Language Models by Proxy", Liu et al., arXiv:2401.08565) and EFT up-scaling
  ("An Emulator for Fine-Tuning Large Language Models using Small Language Models", Mitchell et al.,
  arXiv:2310.12962). With one :class:`ModelTerm` per model and weight ``w_j``::

      s_t = sum_j w_j log softmax(z_j(x_<t))
          = log pi_base^N + sum_i w_i (log pi_ft_i^M - log pi_ref_i^M)      (EFT, several experts)
          = log pi_large + beta (log pi_expert - log pi_anti)             (proxy-tuning, one expert)

  then ``p(x_t) = softmax(s_t)``: the per-token renormalised EFT form. Raw logits instead of log-softmax
  give the same softmax, since each model's log-partition constant is the same for every token and
  cancels. The expert may be the small model with an lmadapt adapter: the anti-expert is then the same
  module in memory, run inside :func:`lmadapt.models.tree.adapters_disabled`, with a cache of its own.
- VAS ("Value Augmented Sampling for Language Model Alignment and Personalization", Han et al.,
  arXiv:2405.06639). With K the ``vas_top_k`` best tokens of ``s_t`` and value models ``V_i``::

      s'_a = s_a + sum_i beta_i (V_i(x_<t, a) - mean_{b in K} V_i(x_<t, b))   for a in K,  -inf outside K

  ``V_i(x_<t, a)`` is read from each value model's KV cache of the prefix, repeated k times (exact). With
  every ``beta_i = 0`` this is plain top-k (k = ``vas_top_k``) sampling of ``s_t``.

Then temperature, top-k and top-p apply to the (steered) scores and a token is drawn (argmax when
``temperature == 0``). All models must share one vocabulary; see :func:`check_vocabularies`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import (
    TokenStreamer,
    check_generation_arguments,
    decode_new,
    encode_prompt,
    eval_mode,
    left_pad,
    seeded,
    stop_token_ids,
)
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import adapters_disabled, model_device
from lmadapt.models.vocab import check_vocabularies, common_vocab_size, logit_width
from lmadapt.progress import track


@dataclass(frozen=True)
class ModelTerm:
    """``weight * log_softmax(model(prompt + generated))``: one causal LM stream of the combined scores."""

    model: nn.Module
    weight: float = 1.0
    adapters_off: bool = False  # run inside adapters_disabled(model): the anti-expert of an adapter expert
    expert_prompt: bool = False  # read the expert's prompt ids instead of the base's


@dataclass(frozen=True)
class ValueTerm:
    """A VAS value model (``forward(...) -> .values (batch, seq)``) and its weight ``beta``."""

    model: nn.Module
    beta: float = 1.0
    expert_prompt: bool = False


@dataclass
class SteeredOutput:
    """What :func:`steer_ids` produced for one batch."""

    tokens: torch.Tensor  # (batch, steps) new ids; rows that stopped are padded with pad_id after the stop
    scores: list[torch.Tensor] = field(default_factory=list)  # trace: per step (batch, vocab) steered scores
    candidates: list[torch.Tensor] = field(default_factory=list)  # trace: per step (batch, k) VAS set K
    values: list[torch.Tensor] = field(default_factory=list)  # trace: per step (n_values, batch, k) raw V


def proxy_terms(base: nn.Module, *, expert: nn.Module | None = None, anti_expert: nn.Module | None = None,
                beta: float = 1.0,
                experts: Sequence[tuple[nn.Module, nn.Module | None, float]] = ()) -> list[ModelTerm]:
    """The terms of ``log pi_base + beta (log pi_expert - log pi_anti) + sum_i w_i (log pi_ft_i - log pi_ref_i)``.

    An anti-expert of ``None`` means the expert itself with its adapters switched off.
    """
    if expert is None and anti_expert is not None:
        raise LmadaptError("anti_expert was given without an expert; give expert= too")
    pairs = ([(expert, anti_expert, beta)] if expert is not None else []) + list(experts)
    terms = [ModelTerm(base, 1.0)]
    for i, (tuned, ref, weight) in enumerate(pairs):
        if ref is None:
            try:
                with adapters_disabled(tuned):
                    pass
            except LmadaptError as exc:
                raise LmadaptError(f"expert {i} has no anti-expert: give one, or an expert with an lmadapt "
                                   f"adapter (then the anti-expert is the same model, adapters off). {exc}") from exc
        terms += [ModelTerm(tuned, float(weight), expert_prompt=True),
                  ModelTerm(tuned if ref is None else ref, -float(weight), adapters_off=ref is None)]
    return terms


class _Stream:
    """One model's decoding state: prompt, attention mask, position ids and KV cache."""

    def __init__(self, model: nn.Module, rows: list[list[int]], pad_id: int, max_new_tokens: int,
                 adapters_off: bool = False) -> None:
        self.model, self.adapters_off, self.device = model, adapters_off, model_device(model)
        ids, mask = left_pad(rows, pad_id, self.device)
        self.mask = torch.cat([mask, mask.new_ones(len(rows), max_new_tokens)], dim=1)  # grows by slicing
        self.width, self.pending, self.cache = ids.shape[1], ids, None
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its start
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **extra: Any) -> Any:
        with adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, **extra)
        self.cache = out.past_key_values
        return out

    def keep(self, first: int, stop: int) -> dict[str, torch.Tensor]:
        """``logits_to_keep`` for positions ``first..stop-1`` only, as an index tensor: it gathers a contiguous
        copy, where an int slices a strided view, and torch's matmul of a strided batch with a frozen
        (no-grad) head expands the head's weight once per row (~1 s for batch 8 on a 49k vocabulary)."""
        return {"logits_to_keep": torch.arange(first, stop, device=self.device)} if self.keeps_logits else {}

    def logprobs(self, vocab: int) -> torch.Tensor:
        """(batch, vocab) fp32 log-probabilities of the next token; feeds the pending tokens."""
        n = self.pending.shape[1]
        extra = self.keep(n - 1, n) if n > 1 else {}  # a prompt: the last position only
        out = self.forward(self.pending, self.mask[:, :self.width], self.positions, **extra)
        return out.logits[:, -1, :vocab].float().log_softmax(-1)

    def append(self, tokens: torch.Tensor) -> None:
        self.pending, self.positions = tokens.to(self.device)[:, None], self.positions[:, -1:] + 1
        self.width += 1


class _ValueStream(_Stream):
    """A value model's state; candidates are scored from the prefix cache repeated k times."""

    k = 0  # candidates per row in the cache, between values() and commit()

    def values(self, candidates: torch.Tensor) -> torch.Tensor:
        """(batch, k) fp32 values ``V(prefix + a)`` of each candidate ``a``."""
        if self.pending is not None:  # the prompt, once
            self.forward(self.pending, self.mask[:, :self.width], self.positions)
            self.pending = None
        b, k = candidates.shape
        self.k = k
        self.cache.batch_repeat_interleave(k)
        self.positions = self.positions[:, -1:] + 1
        mask = self.mask[:, :self.width + 1].repeat_interleave(k, dim=0)
        out = self.forward(candidates.to(self.device).reshape(b * k, 1), mask, self.positions.repeat_interleave(k, 0))
        return out.values[:, -1].float().view(b, k)

    def commit(self, choice: torch.Tensor) -> None:
        """Keep, for each row, the cache row of the chosen candidate (index ``choice`` in K)."""
        rows = torch.arange(len(choice), device=self.device) * self.k + choice.to(self.device)
        self.cache.batch_select_indices(rows)
        self.width += 1


@contextlib.contextmanager
def eval_all(models: Sequence[nn.Module]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in {id(m): m for m in models}.values():
            stack.enter_context(eval_mode(model))
        yield


def processed_scores(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(..., vocab) scores whose softmax is the sampling distribution: ``logits / temperature``, -inf outside the
    ``top_k`` best and outside the smallest set reaching ``top_p`` (the best token is always kept)."""
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def sample_next(scores: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(batch,) next tokens: argmax when ``temperature == 0``, else a draw from
    ``softmax(scores / temperature)`` kept to the ``top_k`` best and the smallest set reaching ``top_p``."""
    if temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(processed_scores(scores, temperature, top_k, top_p).softmax(-1), 1).squeeze(1)


def _vas(scores: torch.Tensor, streams: list[_ValueStream], betas: torch.Tensor,
         k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(steered scores, candidates K, raw values): ``s_a + sum_i beta_i (V_i(a) - mean_K V_i)`` on K."""
    candidates = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    raw = torch.stack([s.values(candidates).to(scores.device) for s in streams])
    shift = (betas[:, None, None] * (raw - raw.mean(-1, keepdim=True))).sum(0)
    steered = torch.full_like(scores, float("-inf")).scatter(1, candidates, scores.gather(1, candidates) + shift)
    return steered, candidates, raw


def steer_ids(terms: Sequence[ModelTerm], prompt_ids: list[list[int]], *,
              expert_prompt_ids: list[list[int]] | None = None, values: Sequence[ValueTerm] = (),
              vas_top_k: int = 10, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, stops: set[int] | frozenset[int] = frozenset(), pad_id: int = 0,
              vocab_size: int | None = None, on_tokens: Callable[[torch.Tensor], None] | None = None,
              trace: bool = False) -> SteeredOutput:
    """Decode one batch of token prompts with the combined scores of ``terms`` (and VAS ``values``).

    ``terms[0]``'s device holds the combined scores. ``on_tokens`` gets each step's (batch,) tokens;
    ``trace=True`` also records every step's steered scores (and the VAS candidates and raw values).
    Sampling uses torch's global generator; wrap the call in a seeded block for reproducibility.
    """
    if not terms:
        raise LmadaptError("steer_ids: give at least one model term (the base model)")
    vocab = vocab_size or min(logit_width(t.model) for t in terms)
    def rows(term: ModelTerm | ValueTerm) -> list[list[int]]:
        return expert_prompt_ids if term.expert_prompt and expert_prompt_ids is not None else prompt_ids

    streams = [_Stream(t.model, rows(t), pad_id, max_new_tokens, t.adapters_off) for t in terms]
    vstreams = [_ValueStream(v.model, rows(v), pad_id, max_new_tokens) for v in values]
    with eval_all([t.model for t in terms] + [v.model for v in values]):
        return _decode(streams, [t.weight for t in terms], vstreams, [v.beta for v in values], vocab,
                       dict(temperature=temperature, top_k=top_k, top_p=top_p), vas_top_k, max_new_tokens,
                       stops, pad_id, on_tokens, trace)


def combine_terms(logprobs: Iterable[torch.Tensor], weights: Sequence[float], device: torch.device) -> torch.Tensor:
    """The combined scores ``s_t = sum_j w_j log_softmax(z_j)`` of the module docstring, from each term's (batch,
    vocab) fp32 log-probabilities in the order of ``weights`` (:func:`proxy_terms`'), accumulated in place on
    ``device`` (one pass over the vocabulary per model; the first tensor becomes the result, so pass fresh ones).
    The steering decoder and the serving engine's proxy-tuned rows both combine with it."""
    terms = iter(logprobs)
    scores = next(terms).to(device)
    if weights[0] != 1.0:
        scores.mul_(weights[0])
    for w, lp in zip(weights[1:], terms):
        scores.add_(lp.to(device), alpha=w)
    return scores


def _combine(streams: list[_Stream], weights: list[float], vocab: int, device: torch.device) -> torch.Tensor:
    """``sum_j w_j log_softmax(z_j)`` of the streams' next tokens (:func:`combine_terms`)."""
    return combine_terms((s.logprobs(vocab) for s in streams), weights, device)


def _decode(streams: list[_Stream], weights: list[float], vstreams: list[_ValueStream], betas: list[float],
            vocab: int, sampling: dict[str, Any], k: int, max_new_tokens: int, stops: set[int] | frozenset[int],
            pad_id: int, on_tokens: Callable[[torch.Tensor], None] | None, trace: bool) -> SteeredOutput:
    device = streams[0].device
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=device)
    beta_t = torch.tensor(betas, dtype=torch.float32, device=device)
    finished = torch.zeros(streams[0].mask.shape[0], dtype=torch.bool, device=device)
    out = SteeredOutput(tokens=torch.empty(0))
    tokens = []
    for step in range(max_new_tokens):
        scores = _combine(streams, weights, vocab, device)
        if vstreams:
            scores, candidates, raw = _vas(scores, vstreams, beta_t, k)
        token = sample_next(scores, **sampling).masked_fill(finished, pad_id)
        tokens.append(token)
        if trace:
            out.scores.append(scores)
            if vstreams:
                out.candidates.append(candidates)
                out.values.append(raw)
        if on_tokens is not None:
            on_tokens(token)
        finished |= torch.isin(token, stop_ids)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        for s in streams:
            s.append(token)
        if vstreams:
            choice = (candidates == token[:, None]).int().argmax(-1)  # a stopped row's pad: any row will do
            for v in vstreams:
                v.commit(choice)
    out.tokens = torch.stack(tokens, dim=1).cpu()
    return out


def _pad_and_stops(tokenizer: PreTrainedTokenizerBase, terms: Sequence[ModelTerm]) -> tuple[int, set[int]]:
    stops = set().union(*(stop_token_ids(t.model, tokenizer) for t in terms))
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)), stops


def prepare_terms(base: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], steer: dict[str, Any],
             expert_tokenizer: PreTrainedTokenizerBase | None, chat: bool, expert_chat: bool | None,
             system_prompt: str | None) -> tuple[list[ModelTerm], int, list[list[int]], list[list[int]] | None]:
    """(terms, vocab size, base prompt ids, expert prompt ids or None when they are the base's)."""
    terms = proxy_terms(base, **steer)
    if expert_tokenizer is not None:
        check_vocabularies(tokenizer, {"expert": expert_tokenizer})
    vocab = common_vocab_size(tokenizer, [t.model for t in terms])
    encoded = [encode_prompt(tokenizer, p, chat=chat, system_prompt=system_prompt) for p in prompts]
    expert_chat = chat if expert_chat is None else expert_chat
    if expert_chat == chat and expert_tokenizer is None:
        return terms, vocab, encoded, None
    expert_tok = expert_tokenizer or tokenizer
    return terms, vocab, encoded, [encode_prompt(expert_tok, p, chat=expert_chat, system_prompt=system_prompt)
                                   for p in prompts]


def steered_generate(base: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                     expert: nn.Module | None = None, anti_expert: nn.Module | None = None, beta: float = 1.0,
                     experts: Sequence[tuple[nn.Module, nn.Module | None, float]] = (),
                     values: Sequence[tuple[nn.Module, float]] = (), vas_top_k: int = 10,
                     expert_tokenizer: PreTrainedTokenizerBase | None = None, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, chat: bool = False,
                     expert_chat: bool | None = None, system_prompt: str | None = None, batch_size: int = 8,
                     stream: Callable[[int, str], None] | None = None, seed: int | None = None,
                     progress: bool | None = False) -> list[str]:
    """The new text for each prompt from the large ``base`` model steered by proxy-tuning/EFT and VAS.

    Scores: ``log pi_base + beta (log pi_expert - log pi_anti) + sum_i w_i (log pi_ft_i - log pi_ref_i)`` over
    ``experts=[(ft_i, ref_i, w_i)]`` (arXiv:2401.08565, arXiv:2310.12962), renormalised per token, then VAS
    ``+ sum_j beta_j centred(V_j)`` on the ``vas_top_k`` best tokens for ``values=[(V_j, beta_j)]``
    (arXiv:2405.06639). ``anti_expert=None`` with an adapter-bearing expert: the same module with its
    adapters off. The experts read the prompt rendered by ``expert_tokenizer`` (default ``tokenizer``),
    as a chat turn when ``expert_chat`` (default: ``chat``). Sampling, batching, stop tokens, ``stream``
    and ``seed`` behave as in :func:`lmadapt.decoding.generation.generate`.
    """
    check_generation_arguments(max_new_tokens, temperature, top_k, top_p, batch_size)
    if vas_top_k < 1:
        raise LmadaptError(f"vas_top_k must be >= 1, got {vas_top_k}")
    terms, vocab, encoded, expert_encoded = prepare_terms(
        base, tokenizer, prompts, dict(expert=expert, anti_expert=anti_expert, beta=beta, experts=experts),
        expert_tokenizer, chat, expert_chat, system_prompt)
    value_terms = [ValueTerm(m, float(b)) for m, b in values]
    pad_id, stops = _pad_and_stops(tokenizer, terms)
    order = list(range(len(prompts))) if stream else sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with seeded(seed, model_device(base)):
        for batch in track(batches, "generate", "prompts", progress, size=len):
            streamer = TokenStreamer(tokenizer, batch, stops, stream) if stream else None
            if streamer is not None:  # a streamer's first call is the prompt (as in model.generate): skipped
                streamer.put(torch.tensor(encoded[batch[0]]))
            out = steer_ids(terms, [encoded[i] for i in batch], values=value_terms, vas_top_k=vas_top_k,
                            expert_prompt_ids=None if expert_encoded is None else [expert_encoded[i] for i in batch],
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stops=stops, pad_id=pad_id, vocab_size=vocab,
                            on_tokens=None if streamer is None else streamer.put)
            for row, i in enumerate(batch):
                outputs[i] = decode_new(tokenizer, out.tokens[row].tolist(), stops)
            if streamer is not None:
                streamer.end()
    return outputs
