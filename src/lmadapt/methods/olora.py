"""OLoRA: LoRA started on an orthonormal basis of each weight (QR decomposition).

"OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", Büyükakyüz, arXiv:2406.01775. With
``W0 = Q R`` (fp32, reduced QR) and s the LoRA scale, as PEFT's ``init_lora_weights="olora"``::

    B0 = Q[:, :r],   A0 = R[:r, :],   W_res = W0 - s B0 A0

B starts orthonormal, which the paper finds speeds up convergence. Note that the residual takes out
``s`` times the first r QR components (PEFT's choice, followed here): with s != 1 that is not exactly those
components. How the start is saved and exported: :mod:`lmadapt.methods.decomposed`.
"""

from __future__ import annotations

import torch

from lmadapt.methods.decomposed import DecomposedConfig, DecomposedLora
from lmadapt.methods.registry import register


def orthonormal_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R[:r], Q[:, :r]) of the reduced QR decomposition of ``weight`` (d_out x d_in, fp32)."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


@register
class Olora(DecomposedLora):
    """OLoRA (arXiv:2406.01775): B starts as the first r columns of Q, A as the first r rows of R (W0 = Q R)."""

    name = "olora"
    config_class = DecomposedConfig

    def decompose(self, module_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return orthonormal_factors(weight, self.config.r)
