"""LAE's offline adapter: a momentum (EMA) copy of the trained adapter parameters, kept by the one loop.

"A Unified Continual Learning Framework with General Parameter-Efficient Tuning" (Gao et al., ICCV 2023,
arXiv:2303.10070), Learning-Accumulation-Ensemble. The *online* PET module learns; after every optimizer step
an *offline* copy accumulates what it learned by momentum (the paper's accumulation step)::

    theta_off <- m * theta_off + (1 - m) * theta_on

and at inference the two adapters are ensembled (:mod:`lmadapt.decoding.ensemble`). It is not a method: the
copy covers whatever parameters the method trains (``method.parameter_groups``: LoRA factors, IA3 vectors,
prompt embeddings, bottleneck adapters, whole weights for ``full``), so it combines with every method. Heads an
objective trains are not averaged (the official code ``gqk/LAE`` shares its classifier head between the two).

Switched on by ``train.lae_momentum`` (:class:`~lmadapt.training.config.TrainConfig`): null is off, 0 makes the
offline copy equal the online one after every step, 1 keeps it where it started. The copy is fp32 whatever the
parameters' dtype; it starts from the online weights (or ``train.lae_offline_init``'s adapter); for the first
``train.lae_warmup_steps`` steps it is set equal to the online weights. Checkpoints keep it
(``lae_offline.safetensors``), so a resumed run ends with the same offline weights as an uninterrupted one;
``lmadapt train`` writes it as ``adapter_offline/`` (:func:`save_offline_adapter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmadapt.adapters.format import read_adapter_tensors, save_adapter
from lmadapt.methods import Method
from lmadapt.objectives.base import Objective
from lmadapt.training.config import TrainConfig
from lmadapt.training.optim import training_groups

OFFLINE_DIR = "adapter_offline"  # beside the run's adapter/


def averaged_parameters(model: nn.Module, method: Method,
                        objective: Objective | None = None) -> dict[str, nn.Parameter]:
    """The parameters LAE averages, by their names in ``model``: every parameter of the method's optimizer
    groups (an objective's heads are left out, as the official code shares its head)."""
    own = {id(p) for g in (objective.parameter_groups(model) if objective is not None else []) for p in g.params}
    trained = {id(p) for g in training_groups(model, method, objective) for p in g.params} - own
    return {name: p for name, p in model.named_parameters() if id(p) in trained}


@contextlib.contextmanager
def swapped_in(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside, the parameters named in ``values`` hold those values (cast to their dtype); the previous ones come
    back on exit. In-place copies under ``no_grad``, so modules that cache on a parameter's version see them."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise KeyError(f"the model has no parameter {unknown[0]!r} ({len(unknown)} unknown)")
    kept = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in kept.items():
                params[name].copy_(value)


class OfflineCopy:
    """The offline parameters (fp32, by parameter name) and the rule that moves them after each optimizer step."""

    def __init__(self, model: nn.Module, method: Method, objective: Objective | None, momentum: float,
                 warmup_steps: int = 0) -> None:
        self.model, self.method, self.objective = model, method, objective
        self.momentum, self.warmup_steps = float(momentum), int(warmup_steps)
        self._params: dict[str, nn.Parameter] = {}
        self.offline: dict[str, torch.Tensor] = {}
        self.track()

    @classmethod
    def for_run(cls, model: nn.Module, method: Method, cfg: TrainConfig,
                objective: Objective | None = None) -> OfflineCopy | None:
        """The run's offline copy as ``cfg`` configures it, starting from the online weights or from the adapter
        folder ``cfg.lae_offline_init``; None when ``cfg.lae_momentum`` is null (LAE off)."""
        if cfg.lae_momentum is None:
            return None
        copy = cls(model, method, objective, cfg.lae_momentum, cfg.lae_warmup_steps)
        if cfg.lae_offline_init:
            copy.offline = copy.from_adapter(cfg.lae_offline_init)
        return copy

    def track(self) -> None:
        """Follow the parameters the method trains now (after a structural change too): a new one starts its
        offline copy from its online value; one no longer trained keeps being averaged towards its (now fixed)
        online value."""
        for name, p in averaged_parameters(self.model, self.method, self.objective).items():
            self._params[name] = p
            if name not in self.offline:
                self.offline[name] = p.detach().float().clone()

    @torch.no_grad()
    def update(self, step: int, retrack: bool = False) -> None:
        """The accumulation after optimizer step ``step`` (1-based): ``off <- m off + (1 - m) on``, with m = 0
        while ``step <= warmup_steps``. ``retrack``: the trainable set changed this step (see :meth:`track`)."""
        if retrack:
            self.track()
        m = 0.0 if step <= self.warmup_steps else self.momentum
        for name, p in self._params.items():
            off = self.offline[name]
            if m == 0.0:
                off.copy_(p.detach())
            else:
                off.mul_(m).add_(p.detach().float(), alpha=1.0 - m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The offline parameters (fp32 CPU copies), keyed by parameter name, as checkpoints save them."""
        return {name: t.detach().to("cpu").contiguous().clone() for name, t in self.offline.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (on resume, after the method's state and tensors). ValueError when it does
        not fit: a name the model lacks, another shape, or a trained parameter it has no value for."""
        params = dict(self.model.named_parameters())
        for name, t in tensors.items():
            if name not in params:
                raise ValueError(f"the LAE offline copy has {name!r}, which this model does not have")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"the LAE offline copy of {name!r} has shape {tuple(t.shape)}, the model's "
                                 f"{tuple(params[name].shape)}")
        missing = sorted(set(averaged_parameters(self.model, self.method, self.objective)) - set(tensors))
        if missing:
            raise ValueError(f"the LAE offline copy has no value for the trained parameter {missing[0]!r}")
        device = {name: params[name].device for name in tensors}
        self.offline = {name: t.to(device[name], torch.float32).clone() for name, t in tensors.items()}
        self._params = {name: params[name] for name in tensors}

    def from_adapter(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The offline values an adapter folder of this run's method gives: its tensors loaded through
        ``method.load_adapter_state``, read back, and the online values put back."""
        tensors = read_adapter_tensors(path)
        with swapped_in(self.model, {n: p.detach() for n, p in self._params.items()}):
            self.method.load_adapter_state(self.model, tensors)
            return {name: p.detach().float().clone() for name, p in self._params.items()}


def save_offline_adapter(model: nn.Module, method: Method, offline: Mapping[str, torch.Tensor], path: str | Path, *,
                         momentum: float, warmup_steps: int = 0, extra: dict[str, Any] | None = None,
                         **save_args: Any) -> Path:
    """Write the offline copy as an adapter folder in the method's format (atomically, as :func:`save_adapter`
    with ``save_args``): the offline values are swapped into ``model`` while it is saved. Its record says
    ``"lae": {"role": "offline", "momentum": m, "warmup_steps": w}``."""
    record = {**(extra or {}), "lae": {"role": "offline", "momentum": momentum, "warmup_steps": warmup_steps}}
    with swapped_in(model, offline):
        return save_adapter(model, method, path, extra=record, **save_args)
