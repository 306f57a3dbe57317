"""The optimizer factory: AdamW over a method's parameter groups, each trainable parameter in exactly one."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmadapt.errors import LmadaptError
from lmadapt.methods import Method, ParamGroup
from lmadapt.objectives.base import Objective
from lmadapt.training.config import TrainConfig


def check_param_groups(model: nn.Module, groups: list) -> None:
    """Every trainable parameter in exactly one group; no frozen parameter in any group."""
    seen: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            if id(p) in seen:
                raise RuntimeError(f"a parameter is in optimizer groups {seen[id(p)]!r} and {g.name!r}")
            if not p.requires_grad:
                raise RuntimeError(f"optimizer group {g.name!r} holds a frozen parameter")
            seen[id(p)] = g.name
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise RuntimeError(f"trainable parameters in no optimizer group, e.g. {orphans[0]}")
    if not seen:
        raise LmadaptError("the method selected no trainable parameters")


def training_groups(model: nn.Module, method: Method, objective: Objective | None = None) -> list[ParamGroup]:
    """The method's parameter groups and the objective's (heads), each parameter in one group: a parameter the
    objective trains (a value head) is taken out of the method's groups, whatever the method selected."""
    own = objective.parameter_groups(model) if objective is not None else []
    if not own:
        return method.parameter_groups(model)
    taken = {id(p) for g in own for p in g.params}
    groups = [dataclasses.replace(g, params=[p for p in g.params if id(p) not in taken])
              for g in method.parameter_groups(model)]
    return [g for g in groups if g.params] + own


def build_optimizer(model: nn.Module, method: Method, cfg: TrainConfig,
                    previous: torch.optim.Optimizer | None = None,
                    objective: Objective | None = None) -> torch.optim.AdamW:
    """AdamW over the method's and the objective's groups (the one optimizer factory); state of parameters
    kept from ``previous`` carries over."""
    groups = training_groups(model, method, objective)
    check_param_groups(model, groups)
    optimizer = torch.optim.AdamW(
        [{"params": g.params, "lr": cfg.lr * g.lr_scale, "lr_scale": g.lr_scale, "name": g.name,
          "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay} for g in groups],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if previous is not None:
        for p, state in previous.state.items():
            if any(p is q for g in optimizer.param_groups for q in g["params"]):
                optimizer.state[p] = state
    return optimizer
