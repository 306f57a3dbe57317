"""The VAS value loss: TD(lambda) returns from terminal rewards, regressed by the value head.

Han et al., "Value Augmented Sampling for Language Model Alignment and Personalization", arXiv:2405.06639.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmadapt.data.tokens import IGNORE
from lmadapt.objectives.causal_lm import model_inputs


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


def value_loss(gamma: float, lam: float) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int, Any]]:
    """The Trainer objective: sum over response states of 0.5 (V(s_t) - G_t)^2 (the loop divides by the count).

    G_t = td_lambda_returns of the same forward's values, detached (no gradient through the target).
    ``batch["rewards"]`` holds each row's final reward; the states are the positions j with labels[j+1] != -100.
    """
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, Any]:
        out = model(**model_inputs(batch))
        values = out.values[:, :-1]
        mask = batch["labels"][:, 1:].to(values.device) != IGNORE
        rewards = terminal_rewards(mask, batch["rewards"].to(values.device))
        returns = td_lambda_returns(values.detach(), rewards, mask, gamma, lam)
        loss = 0.5 * ((values - returns) ** 2)[mask].sum()
        return loss, int(mask.sum()), out
    return loss_fn
