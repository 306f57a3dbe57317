"""Bottleneck adapters, series and parallel, as in LLM-Adapters.

"LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models", Hu et al.,
arXiv:2304.01933 (code: AGI-Edgerunners/LLM-Adapters, ``peft/src/peft/tuners/bottleneck.py``).

One small two-layer network per adapted linear layer (W: d_out x d_in, bias b), with no biases of its own::

    a(h) = s * W_up act(W_down dropout(h))        W_down: bsz x d,  W_up: d' x bsz,  s a float or learned

wired to the layer in one of three ways (``placement`` and ``series_input_modules`` choose per layer):

    series_output (LLM-Adapters' output_adapter):  u = W h + b,  y = u + a(u)          d = d' = d_out
    series_input  (LLM-Adapters' mh_adapter):      y = W (h + a(h)) + b                  d = d' = d_in
    parallel      (LLM-Adapters' parallel_adapter): y = W h + b + a(h)                   d = d_in, d' = d_out

The adapter runs in fp32 (autocast off, the parameters kept in fp32), and the sum with the residual is
rounded once to the layer's dtype. Init ``mam`` (lmadapt's default): W_down Kaiming-uniform (a = sqrt 5),
W_up = 0, so a = 0 and the model is unchanged at init. Init ``bert`` (the LLM-Adapters code default): both
N(0, 0.02), which is not an identity. The activation sits between W_down and W_up, so the update is not a
change of W alone: the adapter cannot be merged. Not in upstream PEFT; lmadapt's format saves it under the
LLM-Adapters keys ``base_model.model.<module>.adapter_down.weight`` / ``adapter_up.weight`` /
``adapter_scaling``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, load_tensors
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    name_matches,
    plain_linear,
    replace_module,
)

# The names are transformers' ACT2FN names, which LLM-Adapters' non_linearity takes.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "linear": lambda z: z,
}
Wiring = Literal["series_output", "series_input", "parallel"]
NOT_MERGEABLE = ("bottleneck adapters cannot be merged into the base weights: the activation between W_down and "
                 "W_up makes the update depend on the input, not a change of W alone. Serve the adapter unmerged "
                 "(lmadapt.load(..., adapter=...) or `lmadapt generate --adapter`)")


@dataclass
class BottleneckConfig:
    placement: Literal["series", "parallel"] = option(
        "series", "series: the adapter on a target's output, u + a(u) (output_adapter), or, for targets named in "
                  "series_input_modules, on its input, W (h + a(h)) + b (mh_adapter); parallel: W h + b + a(h).")
    target_modules: list[str] = option(
        ["down_proj"], "Linear layers that get an adapter: trailing dotted names ('down_proj', 'mlp.up_proj'), "
                       "'re:<regex>' on the full name, or 'all-linear'. The default with placement series is the "
                       "paper's best series placement, after the MLP.")
    series_input_modules: list[str] = option(
        ["gate_proj", "up_proj"], "Series placement only: the targets matching these names take the adapter on "
                                  "their input (LLM-Adapters' Llama wiring); every other target on its output.")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    bottleneck_size: int = option(256, "Width of the bottleneck: W_down is bottleneck_size x d.")
    activation: Literal["tanh", "relu", "gelu", "gelu_new", "silu", "sigmoid", "linear"] = option(
        "tanh", "Non-linearity between W_down and W_up (gelu_new: the tanh approximation; linear: none).")
    scaling: float | Literal["learned"] = option(
        1.0, "s in a(h) = s W_up act(W_down h): a fixed number, or 'learned' (one trainable scalar per layer, "
             "initialised to 1, no weight decay).")
    dropout: float = option(0.0, "Dropout on the adapter's input (training only; the residual is not dropped).")
    init: Literal["mam", "bert"] = option(
        "mam", "mam: W_down Kaiming-uniform, W_up = 0, the model unchanged at init (LLM-Adapters' 'mam_adapter'); "
               "bert: both N(0, 0.02), the LLM-Adapters code default, not an identity at init.")

    def check(self) -> list[str]:
        problems = []
        if self.bottleneck_size < 1:
            problems.append(f"bottleneck_size: must be >= 1, got {self.bottleneck_size}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.scaling != "learned" and (not math.isfinite(self.scaling) or self.scaling == 0):
            problems.append(f"scaling: must be a finite non-zero number or 'learned', got {self.scaling} "
                            f"(0 would switch the adapter off)")
        if not self.target_modules:
            problems.append("target_modules: name at least one linear layer, e.g. [down_proj]")
        return problems


class BottleneckLinear(nn.Module):
    """A linear layer with one bottleneck adapter wired as ``wiring`` (see the module docstring).

    Holds the original ``weight``/``bias`` Parameters under the same names, so the base model's state-dict keys
    do not change. The adapter's parameters stay in fp32 and its arithmetic runs in fp32 with autocast off.
    """

    casts_own_parameters = True  # fp32 adapter parameters by design: they need no autocast

    def __init__(self, base: nn.Linear, wiring: Wiring, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.wiring = wiring
        self.activation = cfg.activation
        d_in = self.out_features if wiring == "series_output" else self.in_features
        d_out = self.in_features if wiring == "series_input" else self.out_features
        f32 = {"dtype": torch.float32, "device": base.weight.device}
        self.adapter_down = nn.Parameter(torch.empty(cfg.bottleneck_size, d_in, **f32))
        self.adapter_up = nn.Parameter(torch.empty(d_out, cfg.bottleneck_size, **f32))
        self.learned_scaling = cfg.scaling == "learned"
        self.scaling = 1.0 if self.learned_scaling else float(cfg.scaling)
        self.adapter_scaling = nn.Parameter(torch.ones(1, **f32)) if self.learned_scaling else None
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if cfg.init == "mam":
                nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))
                nn.init.zeros_(self.adapter_up)
            else:
                nn.init.normal_(self.adapter_down, std=0.02)
                nn.init.normal_(self.adapter_up, std=0.02)
        self._enabled = True

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """a(h) = s W_up act(W_down dropout(h)), in fp32 whatever h's dtype or the autocast state."""
        device_type = h.device.type
        off = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else contextlib.nullcontext()
        with off:
            z = F.linear(self.dropout(h.float()), self.adapter_down.float())
            z = F.linear(ACTIVATIONS[self.activation](z), self.adapter_up.float())
            s = self.adapter_scaling.float() if self.adapter_scaling is not None else self.scaling
            return z * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return F.linear(x, self.weight, self.bias)
        if self.wiring == "series_input":
            return F.linear(_plus(x, self.adapter(x)), self.weight, self.bias)
        out = F.linear(x, self.weight, self.bias)
        return _plus(out, self.adapter(out if self.wiring == "series_output" else x))

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (the adapter left out)."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        scaling = "learned" if self.learned_scaling else f"{self.scaling:g}"
        return (f"in={self.in_features}, out={self.out_features}, wiring={self.wiring}, "
                f"bottleneck={self.adapter_down.shape[0]}, act={self.activation}, scaling={scaling}")


def _plus(residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """residual + delta summed in fp32 and rounded once to the residual's dtype."""
    return (residual.float() + delta).to(residual.dtype)


@register
class Bottleneck(Method):
    """Series/parallel bottleneck adapters (Hu et al., arXiv:2304.01933): a(h) = s W_up act(W_down h), added to a
    linear layer's output (series), input (series, mh_adapter) or beside it (parallel)."""

    name = "bottleneck"
    config_class = BottleneckConfig
    mergeable = False

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__(config)
        self.identity_at_init = config.init == "mam"  # bert's random W_up changes the outputs from the start

    def wiring(self, module_name: str) -> Wiring:
        """How the adapter of target ``module_name`` is wired to it."""
        cfg = self.config
        if cfg.placement == "parallel":
            return "parallel"
        on_input = any(name_matches(module_name, p) for p in cfg.series_input_modules)
        return "series_input" if on_input else "series_output"

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, types=(nn.Linear,), exclude=cfg.exclude_modules)
        self.module_names = [n for n, _ in targets]
        for n, module in targets:
            replace_module(model, n, BottleneckLinear(module, self.wiring(n), cfg))

    def _layers(self, model: nn.Module) -> list[tuple[str, BottleneckLinear]]:
        return list(modules_of_type(model, BottleneckLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = [m for _, m in self._layers(model)]
        groups = [ParamGroup("bottleneck", [m.adapter_down for m in layers] + [m.adapter_up for m in layers])]
        if self.config.scaling == "learned":  # a gain: decaying it would pull the adapter towards off
            groups.append(ParamGroup("bottleneck_scaling", [m.adapter_scaling for m in layers], weight_decay=0.0))
        return groups

    def merge(self, model: nn.Module) -> None:
        raise LmadaptError(NOT_MERGEABLE)

    def unmerge(self, model: nn.Module) -> None:
        raise LmadaptError(NOT_MERGEABLE)

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back, discarding the adapters (the base model again)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def _tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The adapter's parameters under their saved keys."""
        out = {}
        for name, m in self._layers(model):
            out[f"{PEFT_PREFIX}{name}.adapter_down.weight"] = m.adapter_down
            out[f"{PEFT_PREFIX}{name}.adapter_up.weight"] = m.adapter_up
            if m.adapter_scaling is not None:
                out[f"{PEFT_PREFIX}{name}.adapter_scaling"] = m.adapter_scaling
        return out

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._tensors(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors(self._tensors(model), state, "different base model, bottleneck_size or placement?")

    def adapter_config(self) -> dict[str, Any]:
        return {}  # not a PEFT method: the lmadapt record in adapter_config.json identifies the files
