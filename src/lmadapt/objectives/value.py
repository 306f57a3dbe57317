"""The VAS value loss: TD(lambda) returns from terminal rewards, regressed by the value head.

Han et al., "Value Augmented Sampling for Language Model Alignment and Personalization", arXiv:2405.06639.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.data.tokens import IGNORE
from lmadapt.methods.base import ParamGroup
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import count_targets, forward_inputs


def terminal_rewards(mask: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards: ``final[b]`` at the last True position of ``mask[b]``, 0 elsewhere."""
    mask = mask.bool()
    t = mask.shape[1]
    last = (t - 1 - mask.flip(1).float().argmax(dim=1)).clamp(min=0)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = final.float() * mask.any(dim=1)
    return rewards


def td_lambda_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                      lam: float) -> torch.Tensor:
    """TD(lambda) returns G_t over (B, T) tensors; ``mask`` marks each row's (contiguous) response states.

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)        V(s_{t+1}) = 0 past the last masked position
        GAE_t   = delta_t + gamma lambda GAE_{t+1}
        G_t     = GAE_t + V(s_t)                          (0 where the mask is False)

    lambda = gamma = 1 gives the Monte-Carlo return (the sum of later rewards); lambda = 0 the one-step target
    r_t + gamma V(s_{t+1}). Vectorised over the batch, a loop over time.
    """
    m = mask.float()
    v, r = values.float() * m, rewards.float() * m
    gae = torch.zeros_like(v[:, 0])
    out = torch.zeros_like(v)
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(gae)
        gae = (r[:, t] + gamma * next_v - v[:, t] + gamma * lam * gae) * m[:, t]
        out[:, t] = gae
    return (out + v) * m


def value_loss(gamma: float, lam: float) -> Callable[..., tuple[torch.Tensor, int, Any]]:
    """The Trainer objective: sum over response states of 0.5 (V(s_t) - G_t)^2 (the loop divides by the count).

    G_t = td_lambda_returns of the same forward's values, detached (no gradient through the target).
    ``batch["rewards"]`` holds each row's final reward; the states are the positions j with labels[j+1] != -100.
    """
    def loss_fn(model: nn.Module, batch: dict[str, Any], *,
                drop_padding_mask: bool = False) -> tuple[torch.Tensor, int, Any]:
        out = model(**forward_inputs(batch, drop_padding_mask))
        values = out.values[:, :-1]
        mask = batch["labels"][:, 1:].to(values.device) != IGNORE
        rewards = terminal_rewards(mask, batch["rewards"].to(values.device))
        returns = td_lambda_returns(values.detach(), rewards, mask, gamma, lam)
        loss = 0.5 * ((values - returns) ** 2)[mask].sum()
        return loss, int(mask.sum()), out
    return loss_fn


@dataclass
class ValueConfig:
    gamma: float = option(1.0, "Discount gamma of the TD(lambda) targets.")
    lam: float = option(0.95, "lambda of the TD(lambda) targets (1: Monte-Carlo, 0: one-step TD).")
    head_lr_ratio: float = option(1.0, "The value head's learning rate as a multiple of train.lr.")

    def check(self) -> list[str]:
        rules = [("gamma", 0 <= self.gamma <= 1, "in [0, 1]"), ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
                 ("head_lr_ratio", self.head_lr_ratio > 0, "> 0")]
        return [f"{k}: must be {want}, got {getattr(self, k)}" for k, ok, want in rules if not ok]


@register_objective
class Value(Objective):
    """TD(lambda) regression of a value model's head (see :func:`value_loss`); the model is a
    :class:`lmadapt.decoding.value_model.ValueModel`, whose ``value_head`` this objective trains (no weight decay)
    whatever the method does with the backbone. ``batch["rewards"]`` holds each row's final reward."""

    name = "value"
    config_class = ValueConfig

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        head = getattr(model, "value_head", None)
        if not isinstance(head, nn.Module):
            raise TypeError("the value objective trains a ValueModel (a backbone with a value_head)")
        out, inp = model.backbone.get_output_embeddings(), model.backbone.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.weight.requires_grad_(False)  # a value model never uses its LM head
        head.requires_grad_(True)
        self._loss = value_loss(self.config.gamma, self.config.lam)

    def count(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        loss, n, outputs = self._loss(model, batch, drop_padding_mask=drop_padding_mask)
        return LossOutput(loss, n, outputs)

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("value_head", list(model.value_head.parameters()), lr_scale=self.config.head_lr_ratio,
                           weight_decay=0.0)]

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"value_head.{k}": v.detach() for k, v in model.value_head.state_dict().items()}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()})
