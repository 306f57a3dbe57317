"""PiSSA: LoRA started on the principal singular components of each weight.

"PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models", Meng, Wang and
Zhang, arXiv:2404.02948. With ``W0 = U S V^T`` (fp32) and s the LoRA scale::

    A0 = sqrt(S_r / s) V_r^T,   B0 = U_r sqrt(S_r / s),   W_res = W0 - s B0 A0 = W0 - U_r S_r V_r^T

so the adapter trains the r largest components and the frozen residual keeps the rest (PEFT's
``init_lora_weights="pissa"``). Fast PiSSA (``niter > 0``, PEFT's ``"pissa_niter_N"``) takes the r components
from ``torch.svd_lowrank`` with N subspace iterations instead of a full SVD; its random start is seeded by
``seed``, so applying twice gives the same start. How the start is saved and exported:
:mod:`lmadapt.methods.decomposed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmadapt.config import option
from lmadapt.methods.decomposed import DecomposedConfig, DecomposedLora
from lmadapt.methods.registry import register


@dataclass
class PissaConfig(DecomposedConfig):
    niter: int = option(0, "0: exact SVD; N > 0: fast PiSSA, a randomized SVD with N subspace iterations "
                           "(much faster on large layers, close to the exact components).")
    seed: int = option(0, "Seed of the randomized SVD's start (niter > 0), so the start is reproducible.")

    def check(self) -> list[str]:
        problems = super().check()
        if self.niter < 0:
            problems.append(f"niter: must be >= 0 (0: exact SVD), got {self.niter}")
        return problems


def principal_factors(weight: torch.Tensor, r: int, scaling: float, niter: int = 0,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) holding the top-r singular triplets of ``weight`` (d_out x d_in, fp32): s B0 A0 = U_r S_r V_r^T."""
    if niter == 0:
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, sv, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.t()
    root = (sv / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


@register
class Pissa(DecomposedLora):
    """PiSSA (arXiv:2404.02948): A, B start on the top-r singular components; W_res = W0 - U_r S_r V_r^T."""

    name = "pissa"
    config_class = PissaConfig

    def decompose(self, module_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return principal_factors(weight, cfg.r, cfg.scaling, cfg.niter, cfg.seed)
