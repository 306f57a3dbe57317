"""ALLoRA: LoRA without dropout and without a scale, whose steps shrink as the parameters grow.

"ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", Huang and Balestriero, arXiv:2410.09692::

    y = W0 x + b + B A x                         (no dropout, no alpha/r: the scale is exactly 1)
    c(theta) = 1 / sqrt(||theta||^2 + 1/eta^2)   (theta: a row of A or of B, or a whole matrix)
    theta <- theta_old + c(theta_old) * (theta_optimizer - theta_old)

``theta_optimizer`` is where the run's optimizer (AdamW) put the parameter. The multiplier scales the
optimizer's *step*, not the raw gradient, because Adam's m / sqrt(v) would cancel a per-row gradient scale;
with plain SGD the two are the same. ``c(0) = eta``, so B leaves zero with an effective learning rate of
eta * lr; as ||theta|| grows, c tends to 1 / ||theta||, a norm-relative step.

The layer is LoRA's own (:class:`lmadapt.methods.lora_layer.LoraLinear` with alpha = r and dropout 0), so
the saved files are a plain PEFT LoRA with scale 1 that PEFT and vLLM load; lmadapt tells them apart by the
record it keeps in the safetensors header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.methods.base import ParamGroup, StepContext
from lmadapt.methods.lora import Lora
from lmadapt.methods.lora_layer import LoraConfig
from lmadapt.methods.registry import register

Granularity = Literal["row", "matrix"]


@dataclass
class AlloraConfig:
    r: int = option(8, "Rank of the update B A (the update is not scaled: alpha is r).")
    eta: float | None = option(
        None, "Required. The largest step multiplier c(0) = eta, which a parameter at zero (B at init) gets; "
              "c = 1/sqrt(||theta||^2 + 1/eta^2) shrinks as the parameter grows. The paper gives no verified "
              "default.")
    granularity: Granularity = option(
        "row", "Which norm sets c: row (each row of A and each row of B on its own) or matrix (one c per "
               "matrix, from its Frobenius norm).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj', 'self_attn.q_proj'), 're:<regex>' on "
        "the full name, or 'all-linear' (every linear layer but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    init: Literal["default", "random"] = option(
        "default", "default: A Kaiming-uniform, B = 0 (as LoRA); random: B random too (not identity at init; "
                   "for tests).")

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: must be >= 1, got {self.r}")
        if self.eta is None:
            problems.append("eta: required (the step multiplier at zero, c(0) = eta; the paper gives no verified "
                            "default): set it, e.g. eta: 1.0, and tune it like a learning-rate factor")
        elif not self.eta > 0:
            problems.append(f"eta: must be > 0, got {self.eta}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems

    def lora(self) -> LoraConfig:
        """The LoRA layer's settings: scale alpha / r = 1, no dropout."""
        return LoraConfig(r=self.r, alpha=float(self.r), dropout=0.0, rslora=False,
                          target_modules=list(self.target_modules), exclude_modules=list(self.exclude_modules),
                          init=self.init)


def step_scale(theta: torch.Tensor, eta: float, granularity: Granularity) -> torch.Tensor:
    """c(theta) = 1 / sqrt(||theta||^2 + 1/eta^2), one value per row of ``theta`` (shape (rows, 1)) or one for
    the whole matrix (a 0-d tensor), in ``theta``'s dtype.

    Computed as eta / sqrt(1 + (eta ||theta||)^2), the same value, so that c(0) is exactly eta.
    """
    norm = theta.norm(dim=1, keepdim=True) if granularity == "row" else theta.norm()
    return eta * torch.rsqrt(1.0 + (eta * norm).square())


@register
class Allora(Lora):
    """ALLoRA (Huang and Balestriero, arXiv:2410.09692): y = W0 x + B A x, each optimizer step of a row
    theta of A or B scaled by c(theta_old) = 1 / sqrt(||theta_old||^2 + 1/eta^2)."""

    name = "allora"
    config_class = AlloraConfig
    peft_type = "LORA"  # the tensors are a plain LoRA with alpha = r: PEFT loads them as such
    mergeable = True
    named_adapters = False  # the step rule belongs to one trained adapter, not to a pool of switchable ones

    def __init__(self, config: AlloraConfig) -> None:
        super().__init__(config)
        self._before_step: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    def _as_lora(self) -> Lora:
        """The plain LoRA (scale 1, no dropout) that builds and describes this adapter's layers."""
        lora = Lora(self.config.lora())
        if hasattr(self, "module_names"):
            lora.module_names = self.module_names
        return lora

    def apply(self, model: nn.Module) -> None:
        """Freeze the model and put a LoRA layer (scale 1, no dropout) on each target."""
        lora = self._as_lora()
        lora.apply(model)
        self.module_names = lora.module_names

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        factors = self._factors(model)
        return [ParamGroup("allora", [f.lora_A for _, f in factors] + [f.lora_B for _, f in factors])]

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Keep a copy of every A and B as they are before the step (r x (d_in + d_out) numbers a layer)."""
        params = [p for g in self.parameter_groups(ctx.model) for p in g.params if p.requires_grad]
        self._before_step = [(p, p.detach().clone()) for p in params]

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        """theta <- theta_old + c(theta_old) * (theta - theta_old), row by row (or matrix by matrix)."""
        if self._before_step is None:
            raise RuntimeError("allora: after_optimizer_step without before_optimizer_step; the loop must call "
                               "both around optimizer.step()")
        eta, granularity = self.config.eta, self.config.granularity
        for p, old in self._before_step:
            # lerp: old + c (p - old) in one pass, and exactly p where c is 1
            p.copy_(old.lerp_(p, step_scale(old, eta, granularity)))
        self._before_step = None

    def adapter_config(self) -> dict[str, Any]:
        """PEFT's LoRA config of the same tensors: lora_alpha = r, lora_dropout = 0."""
        return self._as_lora().adapter_config()

    @classmethod
    def claims_peft(cls, peft_config: dict[str, Any]) -> bool:
        """Never: a PEFT "LORA" file loads as plain lora; an ALLoRA folder is known by lmadapt's record."""
        return False

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("a PEFT LoRA adapter loads as method 'lora'; only a folder lmadapt saved (its record "
                         "names allora) loads as 'allora'")
