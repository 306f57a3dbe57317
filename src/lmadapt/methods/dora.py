"""DoRA: weight-decomposed low-rank adaptation of linear layers.

"DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., arXiv:2402.09353. Each adapted weight is split
into a magnitude per output row and a direction; LoRA's update changes the direction and ``m`` trains on
its own::

    W' = g ⊙ (W0 + s B A),   g = m / ||W0 + s B A||_row,   m initialised to ||W0 + s B A||_row (= ||W0|| when B = 0)

The forward is PEFT 0.21.2's (``tuners/lora/variants.py`` DoraLinearVariant, ``tuners/lora/dora.py``), which
never forms W'::

    y = W0 x + b + (g - 1) ⊙ W0 x_d + g ⊙ s B A x_d,   x_d = dropout(x)   (= W' x + b without dropout)

With ``detach_norm`` (the default, as PEFT and the paper's section 4.3) ``||W0 + s B A||`` is a constant for
autograd, which saves the d_out x d_in activation of the norm. Merge: W <- W'. Unmerge: W0 = W / g - s B A
with the fp32 norm kept at merge time. The saved adapter is PEFT's LoRA file with ``use_dora``
(``base_model.model.<module>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import AdapterError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, Lora, load_tensors
from lmadapt.methods.lora_layer import LoraConfig, LoraLinear, add_factors
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    plain_linear,
    replace_module,
)

MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's name for m in adapter_model.safetensors


@dataclass
class DoraConfig(LoraConfig):
    detach_norm: bool = option(
        True, "Treat ||W0 + s B A|| as a constant in backward, as PEFT and the paper's memory-saving variant "
        "(section 4.3); false: the full gradient through the norm (one d_out x d_in tensor more per layer).")


class DoraLinear(nn.Module):
    """A linear layer with a DoRA update: y = W0 x + b + (g - 1) ⊙ W0 x_d + g ⊙ s B A x_d (Liu et al.,
    arXiv:2402.09353), g = m / ||W0 + s B A||_row.

    Holds the original ``weight``/``bias`` Parameters under the same names, so the base model's state-dict
    keys do not change, plus fp32 ``lora_A`` (r x d_in), ``lora_B`` (d_out x r) and ``magnitude`` (d_out).
    ``adapter_enabled = False`` gives the base model's output, merged or not.
    """

    casts_own_parameters = True  # A, B and m run in the activations' dtype; the norm is always fp32

    def __init__(self, base: nn.Linear, cfg: DoraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        add_factors(self, self.in_features, self.out_features, cfg, base.weight.device, trainable=True)
        self.detach_norm = cfg.detach_norm
        with torch.no_grad():  # PEFT's start: the norm of W0 + s B A after A and B are initialised
            self.magnitude = nn.Parameter(self.weight_norm())
        self.adapter_enabled = True
        self._merged_norm: torch.Tensor | None = None  # ||W0 + s B A||_row (fp32) when merged: unmerge needs it
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None  # g outside autograd, see _scale

    def adapted_weight(self) -> torch.Tensor:
        """W0 + s B A in fp32 (autocast off: its matmul would run in bf16). Meaningful only unmerged."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return torch.addmm(self.weight.float(), self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| of each output row, in fp32."""
        return torch.linalg.vector_norm(self.adapted_weight(), dim=1)

    def _scale(self) -> torch.Tensor:
        """g = m / ||W0 + s B A||_row in fp32; the norm is a constant for autograd when ``detach_norm``.

        Outside autograd (generation, evaluation) g is cached until a parameter changes: the norm costs a
        d_out x r x d_in product per layer, many times a decoded token's own work.
        """
        if not torch.is_grad_enabled():
            key = tuple(p._version for p in (self.weight, self.lora_A, self.lora_B, self.magnitude))
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, self.magnitude / self.weight_norm())
            return self._cached[1]
        with torch.set_grad_enabled(not self.detach_norm):
            norm = self.weight_norm()
        return self.magnitude / norm

    def _apply(self, fn: Any, recurse: bool = True) -> DoraLinear:
        self._cached = None  # .to()/.half() replace the parameters' data without bumping their versions
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self._merged_norm is not None:
            return out if self.adapter_enabled else self._base_from_merged(x, out)
        if not self.adapter_enabled:
            return out
        dtype = _compute_dtype(x)
        g = self._scale()
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base = F.linear(x, self.weight)  # W0 x_d: the dropped input through the frozen weight, as PEFT
        else:
            base = out if self.bias is None else out - self.bias.to(out.dtype)
        scaled_b = (self.lora_B * (g * self.scaling).unsqueeze(1)).to(dtype)  # g ⊙ s B: d_out x r, not activations
        update = F.linear(F.linear(x, self.lora_A.to(dtype)), scaled_b)
        return out + (g - 1).to(dtype) * base + update

    def _base_from_merged(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """W0 x + b from the merged weight W' = g ⊙ (W0 + s B A): W' x / g - s B A x + b."""
        dtype = _compute_dtype(x)
        g = (self.magnitude / self._merged_norm.to(self.magnitude.device)).to(dtype)
        base = out if self.bias is None else out - self.bias.to(out.dtype)
        update = F.linear(F.linear(x, self.lora_A.to(dtype)), (self.lora_B * self.scaling).to(dtype))
        base = base / g - update
        return base if self.bias is None else base + self.bias.to(base.dtype)

    @property
    def merged(self) -> bool:
        return self._merged_norm is not None

    @torch.no_grad()
    def merge(self) -> None:
        """W <- g ⊙ (W0 + s B A) row-wise, computed in fp32 (a no-op when merged)."""
        if self.merged:
            return
        adapted = self.adapted_weight()
        norm = torch.linalg.vector_norm(adapted, dim=1)
        self.weight.copy_((self.magnitude / norm).unsqueeze(1) * adapted)
        self._merged_norm = norm

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W / g - s B A with the norm kept at merge time, in fp32 (a no-op when not merged)."""
        if not self.merged:
            return
        g = self.magnitude / self._merged_norm.to(self.magnitude.device)
        with torch.autocast(self.weight.device.type, enabled=False):
            w0 = torch.addmm(self.weight.float() / g.unsqueeze(1), self.lora_B.float(), self.lora_A.float(),
                             alpha=-self.scaling)
        self.weight.copy_(w0)
        self._merged_norm = None

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (the merged weight, if merged)."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}, detach_norm={self.detach_norm}, merged={self.merged}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter runs in: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@register
class Dora(Method):
    """Weight-decomposed low-rank adaptation (Liu et al., arXiv:2402.09353): y = g ⊙ (W0 + s B A) x + b,
    g = m / ||W0 + s B A||_row."""

    name = "dora"
    config_class = DoraConfig
    peft_type = "LORA"
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        """Freeze the model and put a :class:`DoraLinear` in place of every targeted linear layer."""
        held = [n for n, m in model.named_modules() if isinstance(m, (DoraLinear, LoraLinear))]
        if held:
            raise AdapterError(f"the model already holds LoRA/DoRA layers ({held[0]}, ...); a DoRA adapter does not "
                               f"share a model with other adapters: apply it to a fresh base model")
        cfg = self.config
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)
        self.module_names = [n for n, _ in targets]
        for n, module in targets:
            replace_module(model, n, DoraLinear(module, cfg))

    def _layers(self, model: nn.Module) -> list[tuple[str, DoraLinear]]:
        return list(modules_of_type(model, DoraLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        """A, B and m in one group; with ``lr_ratio_b`` != 1, B in its own group at that multiple of the
        learning rate. The run's weight decay applies to all of them, m included (what the HF Trainer
        does with PEFT: it decays every parameter but biases and norm layers)."""
        layers = [m for _, m in self._layers(model)]
        a, b = [m.lora_A for m in layers], [m.lora_B for m in layers]
        magnitude = [m.magnitude for m in layers]
        if self.config.lr_ratio_b == 1.0:
            return [ParamGroup("dora", a + b + magnitude)]
        return [ParamGroup("lora_A", a), ParamGroup("lora_B", b, lr_scale=self.config.lr_ratio_b),
                ParamGroup("magnitude", magnitude)]

    def merge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back (merged weights stay; an unmerged adapter is dropped)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    # --- saving: PEFT's LoRA layout with use_dora ------------------------------------------------------
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self._layers(model):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
            state[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"] = m.magnitude.detach()
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        # PEFT writes m without a suffix; accept ``.lora_magnitude_vector.weight`` (the module's own name) too
        suffix = f".{MAGNITUDE_KEY}.weight"
        state = {k.removesuffix(".weight") if k.endswith(suffix) else k: v for k, v in state.items()}
        load_tensors({f"{PEFT_PREFIX}{n}.{key}": getattr(m, attr) for n, m in self._layers(model) for key, attr in
                      (("lora_A.weight", "lora_A"), ("lora_B.weight", "lora_B"), (MAGNITUDE_KEY, "magnitude"))},
                     state, "different base model or rank?")

    def adapter_config(self) -> dict[str, Any]:
        """PEFT's LoRA config, as lmadapt's lora writes it, with ``use_dora``."""
        lora = Lora(self.config)
        lora.module_names = getattr(self, "module_names", None)
        return {**lora.adapter_config(), "use_dora": True}

    @classmethod
    def claims_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT "LORA" files with ``use_dora``."""
        return super().claims_peft(peft_config) and bool(peft_config.get("use_dora"))

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        """LoRA's reading of the file (it refuses the options lmadapt cannot honour); PEFT always detaches
        the norm, which is ``detach_norm``'s default."""
        return Lora.config_from_peft({**peft, "use_dora": False})
