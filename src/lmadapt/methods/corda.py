"""CorDA: LoRA started from an SVD of the weight times the covariance of its inputs on chosen data.

"CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient
Fine-tuning", Yang et al., arXiv:2406.05223; follows PEFT's ``init_lora_weights="corda"`` (``preprocess_corda``).

For each target layer, from the inputs X (tokens x d_in) of each calibration sample (one batch row, its
padding left out)::

    C  = mean over samples of  (X / |max X|)^T (X / |max X|)
    C' = C + damp mean(diag C) I      (damp = 0.01, doubled until ||C' C'^-1 - I|| < 0.05)
    U S V^T = SVD(W0 C'),   W0 = U S (V^T C'^-1)
    ipm (instruction-previewed): the r largest components;  kpm (knowledge-preserved): the r smallest
    A0 = sqrt(S_sel / s) (V^T C'^-1)_sel,   B0 = U_sel sqrt(S_sel / s),   W_res = W0 - s B0 A0

With ``mode: ipm`` the calibration data should be the task's (faster convergence on it); with ``mode: kpm``
data whose knowledge must survive (e.g. general questions), which the frozen principal components keep.
The calibration batches are the first ``calibration_batches`` training batches (``lmadapt train``), or any
batches given to :meth:`Corda.calibrate`. How the start is saved and exported: :mod:`lmadapt.methods.decomposed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import ParamGroup
from lmadapt.methods.decomposed import DecomposedConfig, DecomposedLora
from lmadapt.methods.registry import register
from lmadapt.models.tree import find_modules


@dataclass
class CordaConfig(DecomposedConfig):
    mode: Literal["ipm", "kpm"] = option(
        "ipm", "ipm: adapt the r largest context-oriented components (calibrate on the task); kpm: adapt the r "
        "smallest and keep the principal ones frozen (calibrate on knowledge to preserve).")
    calibration_batches: int = option(
        8, "Training batches whose inputs give each layer's covariance (every row is one sample); PEFT's rule of "
           "thumb is hidden_size / tokens_per_sample * 128 samples.")

    def check(self) -> list[str]:
        problems = super().check()
        if self.calibration_batches < 1:
            problems.append(f"calibration_batches: CorDA needs at least 1, got {self.calibration_batches}")
        return problems


def input_covariances(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Each named linear layer's mean over samples (batch rows, padding left out) of X^T X, X scaled by 1/|max X|.

    Layers fed the same tensor (q/k/v, gate/up) share one computation and one matrix.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    count = 0
    # this batch's inputs by identity (each kept alive so no later tensor can reuse its id) -> the first layer
    # that read it. Layers fed the same input share that layer's running sum: one d_in x d_in matrix per input,
    # never one per sample (that held GBs on a 135M model).
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    mask: torch.Tensor | None = None

    def hook(name: str):
        def run(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0]
            first = seen[id(x)][1] if id(x) in seen else None
            if first not in (None, name) and first in sums and sums.get(name, sums[first]) is sums[first]:
                sums[name] = sums[first]  # the same input in every batch: one shared sum
                return
            seen.setdefault(id(x), (x, name))
            for row_cov in _sample_covariances(x.detach(), mask):  # sample by sample, the order PEFT sums in
                if name in sums:
                    sums[name].add_(row_cov)
                else:
                    sums[name] = row_cov
        return run

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                model(input_ids=ids, attention_mask=mask, position_ids=batch.get("position_ids"))
                count += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: s / count for n, s in sums.items()}


def _sample_covariances(x: torch.Tensor, mask: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """(X_row / |max X_row|)^T (X_row / |max X_row|) for each row, X_row the row's real tokens, in fp32, one at
    a time."""
    for row in range(x.shape[0]):
        xs = x[row].float() if mask is None else x[row][mask[row].bool()].float()
        if xs.numel() == 0:
            continue
        xs = xs / xs.max().abs()
        if not torch.isfinite(xs).all():
            raise LmadaptError("CorDA calibration: a layer's inputs hold NaN or Inf (or a row of zeros); check the "
                               "model in fp32 and the calibration data")
        yield xs.t() @ xs


def context_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, scaling: float, mode: str,
                    name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) from the SVD of ``weight`` C' (the damped covariance), the r largest (ipm) or smallest (kpm)."""
    if not torch.isfinite(cov).all():
        raise LmadaptError(f"CorDA: the input covariance of {name} holds NaN or Inf; check the calibration data")
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    while True:  # doubling the damping until C' inverts cleanly (PEFT's rule)
        fixed = cov + eye * cov.diagonal().mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
        if damp > 1e6:
            raise LmadaptError(f"CorDA: the input covariance of {name} cannot be inverted even with heavy damping; "
                               f"calibrate on more (and more varied) data")
    u, sv, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = vh @ inv  # rows: right vectors mapped back through C'^-1
    pick = slice(0, r) if mode == "ipm" else slice(sv.shape[0] - r, sv.shape[0])
    u, sv, v = u[:, pick], sv[pick], v[pick]
    if not (torch.isfinite(sv).all() and torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise LmadaptError(f"CorDA: the decomposition of {name} holds NaN or Inf; check the calibration data")
    root = (sv / scaling).sqrt()
    return (root[:, None] * v).contiguous(), (u * root[None, :]).contiguous()


@register
class Corda(DecomposedLora):
    """CorDA (arXiv:2406.05223): A, B start on the components of W0 C' that the calibration context drives most
    (``ipm``) or least (``kpm``)."""

    name = "corda"
    config_class = CordaConfig

    def __init__(self, config: CordaConfig) -> None:
        super().__init__(config)
        self._covariances: dict[str, torch.Tensor] = {}
        self._started = False  # True once a start is known: from calibration, or from a loaded adapter

    def calibrate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        if not batches:
            raise LmadaptError("CorDA: calibrate() got no batches; give it some of the task's (ipm) or of the "
                               "knowledge to keep (kpm)")
        cfg = self.config
        names = [n for n, _ in find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)]
        self._covariances = input_covariances(model, names, batches)

    def decompose(self, module_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cov = self._covariances.pop(module_name, None)
        if cov is None:
            return None
        self._started = True
        cfg = self.config
        return context_factors(weight, cov.to(weight.device), cfg.r, cfg.scaling, cfg.mode, module_name)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state(model, state)
        self._started = True

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        if not self._started:
            raise LmadaptError("CorDA was applied without calibration: call calibrate(model, batches) before "
                               "apply() (lmadapt train does, with method.calibration_batches training batches), or "
                               "load a saved corda adapter")
        return super().parameter_groups(model)
