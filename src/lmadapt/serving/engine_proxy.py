"""Proxy-tuned models in the serving engine: the base model steered, token by token, by a small tuned pair.

Proxy-tuning ("Tuning Language Models by Proxy", Liu et al., arXiv:2401.08565) and EFT up-scaling ("An Emulator
for Fine-Tuning Large Language Models using Small Language Models", Mitchell et al., arXiv:2310.12962) draw each
next token of the large model from::

    s_t = log pi_large(. | x_<t) + beta (log pi_expert(. | x_<t) - log pi_anti(. | x_<t)),    p(x_t) = softmax(s_t)

where the *expert* is a small model tuned for the task and the *anti-expert* the same small model untuned. The
terms and their weights are :func:`lmadapt.decoding.steering.proxy_terms`', and the sum is
:func:`lmadapt.decoding.steering.combine_terms`, the function ``lmadapt generate --proxy-...`` decodes with; so a
greedy proxy-tuned request gives the tokens that command gives for the same prompt ids.

A proxy is served under a name of its own (:class:`ProxySpec`: ``NAME=EXPERT,ANTI[,BETA]``) by a group of its own
(:class:`ProxyGroup`): the engine's base model (adapters off) is the large model, and every row holds one KV
cache per model: large, expert, anti-expert, each a :class:`~lmadapt.serving.batch_cache.BatchCache` of the same
rows. A step runs the three forwards on the group's rows (prefill of the joiners, or one token per row),
combines their log-probabilities, and each row then samples from ``s_t`` with its own settings; the
log-probabilities it reports are ``log_softmax(s_t)``, the proxy-tuned distribution. When the expert is the small
model with an adapter, the anti-expert is the same module run with its adapters off
(:func:`lmadapt.models.tree.adapters_disabled`), with a cache of its own.

All three models read the same prompt ids (the base model's tokenizer and chat template), so their tokenizers
must agree (:func:`lmadapt.models.vocab.check_vocabularies`); one that differs is refused when the proxy is added.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmadapt.adapters.format import CONFIG_NAME, load_adapter_contents
from lmadapt.decoding.generation import stop_token_ids
from lmadapt.decoding.steering import ModelTerm, combine_terms, proxy_terms
from lmadapt.errors import LmadaptError
from lmadapt.models.builtins import BUILTINS, find_builtin
from lmadapt.models.loading import ModelConfig, load_model
from lmadapt.models.tree import adapters_disabled, model_device
from lmadapt.models.vocab import check_vocabularies, common_vocab_size
from lmadapt.serving.batch_cache import BatchCache, model_forward, prefill
from lmadapt.serving.engine_adapters import probe

if TYPE_CHECKING:
    from lmadapt.serving.engine_steps import Row

SPEC_FORM = "NAME=EXPERT,ANTI[,BETA]"


@dataclass(frozen=True)
class ProxySpec:
    """One ``--proxy NAME=EXPERT,ANTI[,BETA]``: the model ``name`` clients send, steered by EXPERT minus ANTI.

    The two forms of ``lmadapt generate``'s proxy flags, told apart by what EXPERT is:

    - EXPERT an adapter folder, ANTI the small model it was trained on (built-in name or folder): the expert is ANTI
      with the adapter, the anti-expert ANTI itself (``--proxy-expert-adapter EXPERT --proxy-small-model ANTI``);
    - EXPERT a tuned small model, ANTI the untuned one it came from, both built-in names or model folders
      (``--proxy-expert EXPERT --proxy-anti-expert ANTI``).

    ``beta`` (default 1.0, ``--proxy-beta``) weighs the difference. Paths may not contain a comma.
    """

    name: str
    expert: str
    anti: str
    beta: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ProxySpec:
        """The spec ``text`` (``NAME=EXPERT,ANTI[,BETA]``); a LmadaptError saying what is wrong otherwise."""
        name, sep, rest = text.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        if not sep or not name.strip() or len(parts) not in (2, 3) or not all(parts):
            raise LmadaptError(f"expected {SPEC_FORM} (EXPERT: an adapter folder or a tuned small model; ANTI: the "
                               f"small model it was tuned from; BETA: a number, default 1.0), got {text!r}")
        beta = 1.0
        if len(parts) == 3:
            try:
                beta = float(parts[2])
            except ValueError:
                beta = math.nan
            if not math.isfinite(beta):
                raise LmadaptError(f"{text!r}: BETA must be a finite number (the weight of expert - anti-expert), "
                                   f"got {parts[2]!r}")
        return cls(name.strip(), parts[0], parts[1], beta)

    @property
    def expert_is_adapter(self) -> bool:
        """EXPERT is an adapter folder (the small model + adapter form)."""
        return (Path(self.expert).expanduser() / CONFIG_NAME).is_file()

    def problems(self) -> list[str]:
        """What is wrong with EXPERT and ANTI as found on disk (nothing is loaded), each naming the proxy."""
        out = []
        if not self.expert_is_adapter and not _is_model(self.expert):
            out.append(f"proxy {self.name!r}: EXPERT {self.expert!r} is neither an adapter folder "
                       f"({CONFIG_NAME}), a model folder (config.json) nor a built-in model ({', '.join(BUILTINS)})")
        if (Path(self.anti).expanduser() / CONFIG_NAME).is_file():
            out.append(f"proxy {self.name!r}: ANTI {self.anti!r} is an adapter folder; ANTI is a model: the small "
                       f"base model the expert was tuned from (a built-in name or a model folder)")
        elif not _is_model(self.anti):
            out.append(f"proxy {self.name!r}: ANTI {self.anti!r} is neither a model folder (config.json) nor a "
                       f"built-in model ({', '.join(BUILTINS)})")
        return out

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of it: the expert, the anti-expert, beta, and the form."""
        if self.expert_is_adapter:
            return {"expert": f"{self.anti} + adapter {self.expert}", "anti_expert": self.anti, "beta": self.beta,
                    "expert_adapter": self.expert, "small_model": self.anti}
        return {"expert": self.expert, "anti_expert": self.anti, "beta": self.beta}


def _is_model(name_or_path: str) -> bool:
    return find_builtin(name_or_path) is not None or (Path(name_or_path).expanduser() / "config.json").is_file()


@dataclass
class ProxyModel:
    """A loaded proxy: the small ``expert`` and ``anti`` models (``anti`` None: the expert with its adapters off),
    ``beta``, the tokenizers they came with (label -> tokenizer, checked against the engine's), and ``info``
    (:meth:`ProxySpec.describe`)."""

    name: str
    expert: nn.Module
    anti: nn.Module | None
    beta: float
    tokenizers: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def load_proxy(spec: ProxySpec, *, dtype: str | None = None, device: str | None = None,
               force: bool = False) -> ProxyModel:
    """Load the small models of ``spec`` (as ``lmadapt generate`` loads its proxy flags); ``force``: apply an expert
    adapter trained on other small-model weights."""
    problems = spec.problems()
    if problems:
        raise LmadaptError("; ".join(problems))
    extra = {k: v for k, v in {"dtype": dtype, "device": device}.items() if v}
    small, small_tok = load_model(ModelConfig(name_or_path=spec.anti, **extra))
    if spec.expert_is_adapter:
        loaded = load_adapter_contents(small, spec.expert, tokenizer=small_tok, force=force)
        tokenizers = {f"small model {spec.anti}": small_tok, f"expert adapter {spec.expert}": loaded.tokenizer or small_tok}
        return ProxyModel(spec.name, small.eval(), None, spec.beta, tokenizers, spec.describe())
    expert, expert_tok = load_model(ModelConfig(name_or_path=spec.expert, **extra))
    tokenizers = {f"expert {spec.expert}": expert_tok, f"anti-expert {spec.anti}": small_tok}
    return ProxyModel(spec.name, expert.eval(), small.eval(), spec.beta, tokenizers, spec.describe())


@dataclass
class ProxyBatch:
    """The KV caches of a proxy group's rows: one :class:`BatchCache` per model, all of the same rows."""

    parts: list[BatchCache]

    @property
    def rows(self) -> int:
        return self.parts[0].rows

    def keep(self, rows: list[int]) -> None:
        for part in self.parts:
            part.keep(rows)

    def extend(self, other: ProxyBatch) -> None:
        for part, theirs in zip(self.parts, other.parts):
            part.extend(theirs)


class ProxyGroup:
    """The rows of one proxy-tuned model, decoded together: three forwards per step (large, expert, anti-expert),
    their log-probabilities combined into ``s_t`` (the module docstring). A group of the engine's
    :class:`~lmadapt.serving.engine_steps.Batcher`, like an adapter's; made by :meth:`Engine.add_proxy`.

    Checks, before it serves: the small models' tokenizers agree with ``tokenizer`` (the engine's), every model has
    logits for all its tokens, the anti-expert exists (an adapter expert must be able to switch its adapter off),
    and the small models' KV caches are ones the batch can edit."""

    def __init__(self, large: nn.Module, proxy: ProxyModel, tokenizer: Any) -> None:
        small = [proxy.expert] + ([proxy.anti] if proxy.anti is not None else [])
        try:
            check_vocabularies(tokenizer, proxy.tokenizers)
            self.terms: list[ModelTerm] = proxy_terms(large, expert=proxy.expert, anti_expert=proxy.anti,
                                                      beta=proxy.beta)
            self.vocab = common_vocab_size(tokenizer, [t.model for t in self.terms])  # logit columns all share
            for model in small:
                probe(model)
        except LmadaptError as exc:
            raise LmadaptError(f"cannot serve the proxy-tuned model {proxy.name!r}: {exc}") from None
        self.name, self.proxy, self.model = proxy.name, proxy, large
        self.weights = [t.weight for t in self.terms]
        self.input_vocab = min(m.get_input_embeddings().num_embeddings for m in [large, *small])
        contexts = [getattr(m.config, "max_position_embeddings", None) for m in [large, *small]]
        self.context: int | None = min((c for c in contexts if c), default=None)
        self.stop_ids = frozenset().union(*(stop_token_ids(m, tokenizer) for m in small))
        self.device = model_device(large)
        self.forwards = len(self.terms)  # forwards per step
        self.rows: list[Row] = []
        self.batch = self._empty()

    def describe(self) -> dict[str, Any]:
        """The proxy's info (:meth:`ProxySpec.describe`) and its context length."""
        return {**self.proxy.info, "beta": self.proxy.beta, "context_length": self.context}

    def adapters(self, rows: list[Row]) -> list[str | None]:
        """The adapter each row takes through the base model: none (the large model is the plain base)."""
        return [None] * len(rows)

    def clear(self) -> None:
        self.rows, self.batch = [], self._empty()

    def _empty(self) -> ProxyBatch:
        return ProxyBatch([BatchCache() for _ in self.terms])

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ProxyBatch]:
        """(``s`` for the next token (B, vocab), the rows' caches) of ``prompts`` through the three models."""
        logprobs, parts = [], []
        for term in self.terms:
            with _term_context(term):
                logits, part = prefill(term.model, prompts, pad_id, model_device(term.model))
            logprobs.append(logits[:, :self.vocab].log_softmax(-1))
            parts.append(part)
        return combine_terms(logprobs, self.weights, self.device), ProxyBatch(parts)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``ids`` (B, 1)) to the three models; ``s`` for the next token (B, vocab)."""
        logprobs = []
        for term, part in zip(self.terms, self.batch.parts):
            mask, positions = part.step_inputs()
            with _term_context(term):
                logits, cache = model_forward(term.model, ids.to(model_device(term.model)), mask, positions,
                                              part.cache)
            part.stepped(cache)
            logprobs.append(logits[:, :self.vocab].log_softmax(-1))
        return combine_terms(logprobs, self.weights, self.device)


def _term_context(term: ModelTerm) -> contextlib.AbstractContextManager[Any]:
    """The anti-expert of an adapter expert runs with the adapters off; every other term as it is."""
    return adapters_disabled(term.model) if term.adapters_off else contextlib.nullcontext()
