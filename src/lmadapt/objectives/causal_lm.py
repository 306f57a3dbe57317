"""The causal language-modelling objective: next-token cross-entropy on the tokens whose label is set.

It serves SFT and continual pretraining alike; the data decides which tokens carry loss through ``labels``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.data.tokens import IGNORE
from lmadapt.objectives.base import LossOutput, Objective, register_objective

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that the model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def causal_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """:func:`model_inputs` for a causal LM, without an attention mask that only marks right padding.

    Under a causal mask no real token attends to a later position, so with every row's padding at its
    end the padding mask changes nothing a real token computes; the padding positions' own outputs
    differ, but they carry no loss and so no gradient. Without the mask, transformers' sdpa attention
    runs its plain causal kernel (13% faster fwd+bwd than with a mask at 490 tokens on CPU) and builds
    no (B, 1, L, L) mask. A left-padded or gapped mask is kept.
    """
    inputs = model_inputs(batch)
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all()):
        del inputs["attention_mask"]
    return inputs


def forward_inputs(batch: dict[str, Any], drop_padding_mask: bool) -> dict[str, torch.Tensor]:
    """:func:`causal_inputs` when a right-padding mask may be dropped (causal attention everywhere), else
    :func:`model_inputs` with the mask as collated."""
    return causal_inputs(batch) if drop_padding_mask else model_inputs(batch)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry next-token loss: positions t whose label at t + 1 is set."""
    return int((labels[:, 1:] != IGNORE).sum())


@functools.lru_cache(maxsize=64)
def takes_logits_to_keep(forward_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def target_positions(model: nn.Module, labels: torch.Tensor) -> torch.Tensor | None:
    """Sequence positions whose next token carries loss in any row, or None to keep every position.

    With prompt masking most positions predict nothing that is trained; asking the model for logits
    only at these positions (transformers' ``logits_to_keep``) skips most of the output projection
    and the full-vocabulary logits, which dominate SFT on short answers. Kept only when it saves
    at least a quarter of the positions.
    """
    if not takes_logits_to_keep(type(model)):
        return None
    wanted = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()
    if wanted.numel() > 0.75 * (labels.shape[1] - 1):
        return None
    return wanted


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], *,
                   drop_padding_mask: bool = True) -> tuple[torch.Tensor, int, Any]:
    """Summed next-token cross-entropy over the tokens whose label is not -100.

    Returns (loss_sum, n_target_tokens, model_outputs). The loop divides by the tokens of the whole
    accumulated step, so every target token weighs the same however the step was split.
        loss = - sum_t log p(x_{t+1} | x_{<=t}) over target positions t
    ``outputs.logits`` holds the logits at ``outputs.logit_positions`` (None: every position but
    the last is used).
    """
    labels = batch["labels"]
    positions = target_positions(model, labels)
    if positions is None:
        outputs = model(**forward_inputs(batch, drop_padding_mask), use_cache=False)
        logits = outputs.logits[:, :-1, :]
        targets = labels[:, 1:].to(logits.device)
    else:
        outputs = model(**forward_inputs(batch, drop_padding_mask), use_cache=False, logits_to_keep=positions)
        logits = outputs.logits
        targets = labels[:, positions + 1].to(logits.device)
    outputs.logit_positions = positions
    n_tokens = int((targets != -100).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, n_tokens, outputs


@dataclass
class CausalLMConfig:
    """The causal LM objective has no settings: the data's ``labels`` say which tokens carry loss."""


@register_objective
class CausalLM(Objective):
    """Next-token cross-entropy over the target tokens (SFT with prompt masking, or raw text):
    loss = - sum_t log p(x_{t+1} | x_{<=t}), normalised by the number of target tokens of the step."""

    name = "causal_lm"
    config_class = CausalLMConfig

    def count(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        loss, n, outputs = causal_lm_loss(model, batch, drop_padding_mask=drop_padding_mask)
        return LossOutput(loss, n, outputs)
