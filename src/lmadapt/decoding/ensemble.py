"""An ensemble of causal LMs (LAE's online and offline adapters) that decodes and scores as one model.

LAE ("A Unified Continual Learning Framework with General Parameter-Efficient Tuning", Gao et al., ICCV 2023,
arXiv:2303.10070) predicts with the ensemble of the online and the offline (momentum) adapter
(:mod:`lmadapt.training.lae` keeps the offline one). For a language model the ensemble is a next-token
distribution, made per position from the members' log-probabilities ``l_j = log_softmax(z_j)`` with weights
``w_j`` (summing to 1)::

    prob     s = log sum_j w_j exp(l_j)      the mixture of the probabilities (default)
    logprob  s = sum_j w_j l_j               the (renormalised) geometric mean of the probabilities
    max      s = max_j l_j                   the official code's rule (gqk/LAE takes the elementwise maximum
                                             of the softmax outputs), renormalised

and ``p(x_t) = softmax(s)``. :class:`EnsembleLM` returns ``s`` as its logits, so everything in lmadapt that takes
a causal LM takes it: every evaluation task, :func:`lmadapt.decoding.scoring.score_continuations`,
:func:`lmadapt.decoding.generation.generate` (through :meth:`EnsembleLM.generate`, which decodes with the
steering decoder :func:`lmadapt.decoding.steering.steer_ids` instead of transformers' ``generate``) and
proxy-tuning as the base model. Each member keeps its own KV cache (:class:`EnsembleCache`).

A member is a model, optionally with the named adapter it runs with (:mod:`lmadapt.adapters.pool`): two LoRA
adapters share one base model that way; other methods need one model instance per member
(:func:`lmadapt.api.load_ensemble` chooses).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmadapt.adapters.pool import active_adapters
from lmadapt.decoding.steering import ModelTerm, steer_ids
from lmadapt.errors import LmadaptError

Combine = Literal["prob", "logprob", "max"]
COMBINES: tuple[str, ...] = get_args(Combine)


def combine_logprobs(logprobs: Sequence[torch.Tensor], combine: Combine = "prob",
                     weights: Sequence[float] | None = None) -> torch.Tensor:
    """The ensemble's scores ``s`` (``softmax(s)`` is its distribution) from the members' log-probabilities
    (same shape, last dimension the vocabulary), as the module docstring defines them; fp32 at least."""
    if combine not in COMBINES:
        raise LmadaptError(f"ensemble combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    n = len(logprobs)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    stacked = torch.stack([lp.float() if lp.dtype in (torch.float16, torch.bfloat16) else lp for lp in logprobs])
    if combine == "max":
        return stacked.amax(0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if combine == "logprob":
        return (w * stacked).sum(0)
    return torch.logsumexp(stacked + w.log(), dim=0)


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: ``model``, run with only the named adapter ``adapter`` active (None: as it is)."""

    model: nn.Module
    adapter: str | None = None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return active_adapters(self.model, [self.adapter]) if self.adapter is not None else contextlib.nullcontext()


class EnsembleCache:
    """The members' KV caches, one each, handed back and forth as one (what callers do to a cache, it does to each)."""

    def __init__(self, caches: Sequence[Any]) -> None:
        self.caches = list(caches)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for c in self.caches:
            c.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for c in self.caches:
            c.batch_select_indices(indices)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length(layer_idx)


class EnsembleLM(nn.Module):
    """Causal LMs as one: its logits are the ensemble scores of :func:`combine_logprobs` at every position.

    ``weights`` (default equal) must be positive; ``combine``: ``prob`` (mixture, default), ``logprob`` or ``max``.
    """

    def __init__(self, members: Sequence[Member], combine: Combine = "prob",
                 weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise LmadaptError("an ensemble needs at least two members")
        if combine not in COMBINES:
            raise LmadaptError(f"ensemble combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if weights is not None and (len(weights) != len(members) or any(w <= 0 for w in weights)):
            raise LmadaptError(f"ensemble weights: one positive weight per member ({len(members)}), got {weights}")
        total = sum(weights) if weights is not None else len(members)
        self.weights = [float(w) / total for w in (weights if weights is not None else [1.0] * len(members))]
        self.members, self.combine = list(members), combine
        self.models = nn.ModuleList({id(m.model): m.model for m in members}.values())  # each shared model once

    @property
    def config(self) -> Any:
        return self.members[0].model.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.members[0].model, "generation_config", None)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: EnsembleCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Each member's forward on the same inputs (with its own cache), its logits turned into log-probabilities
        and combined; ``past_key_values`` is an :class:`EnsembleCache` (or None)."""
        if "labels" in kwargs:
            raise LmadaptError("EnsembleLM computes no loss: score its logits (they are the ensemble's scores)")
        if past_key_values is not None and not isinstance(past_key_values, EnsembleCache):
            raise LmadaptError("EnsembleLM: past_key_values must be the EnsembleCache a previous call returned")
        logprobs, caches = [], []
        for i, member in enumerate(self.members):
            cache = None if past_key_values is None else past_key_values.caches[i]
            with member.context():
                out = member.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=cache, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                   **kwargs)
            logprobs.append(out.logits.float().log_softmax(-1))
            caches.append(out.past_key_values)
        logits = combine_logprobs(logprobs, self.combine, self.weights)
        cache_out = EnsembleCache(caches) if all(c is not None for c in caches) else None
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache_out)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
        """The subset of transformers' ``generate`` that :func:`lmadapt.decoding.generation.generate` uses: greedy
        or sampled (temperature, top-k, top-p) decoding of a left-padded batch until EOS or ``max_new_tokens``,
        by :func:`lmadapt.decoding.steering.steer_ids`. Returns the prompt ids followed by the new ids (CPU)."""
        gc = generation_config if generation_config is not None else self.generation_config
        unsupported = [f"{k}={v!r}" for k, v in {**kwargs, "num_beams": getattr(gc, "num_beams", 1),
                                                  "num_return_sequences": getattr(gc, "num_return_sequences", 1),
                                                  "repetition_penalty": getattr(gc, "repetition_penalty", 1.0)}.items()
                       if v not in (None, 1, 1.0)]
        if unsupported:
            raise LmadaptError(f"EnsembleLM.generate decodes one sequence per prompt, greedy or sampled, with "
                               f"temperature, top_k and top_p only; not {', '.join(unsupported)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
        eos = getattr(gc, "eos_token_id", None)
        stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = gc.pad_token_id if getattr(gc, "pad_token_id", None) is not None else min(stops, default=0)
        sampling = {"temperature": float(gc.temperature or 1.0), "top_k": int(gc.top_k or 0),
                    "top_p": float(gc.top_p if gc.top_p is not None else 1.0)} if gc.do_sample else {}
        if streamer is not None:
            streamer.put(input_ids.cpu())  # as transformers does: the prompt first
        out = steer_ids([ModelTerm(self)], rows, max_new_tokens=int(gc.max_new_tokens), stops=stops, pad_id=pad,
                        on_tokens=None if streamer is None else lambda t: streamer.put(t.cpu()), **sampling)
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids.cpu(), out.tokens], dim=1)

