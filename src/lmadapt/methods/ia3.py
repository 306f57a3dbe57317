"""(IA)^3: learned vectors that rescale keys, values and the MLP's intermediate activations, as in PEFT 0.21
(``peft.tuners.ia3``).

"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", Liu et al.,
arXiv:2205.05638. The paper computes ``softmax(Q (l_k ⊙ K)^T / sqrt(d)) (l_v ⊙ V)`` and ``(l_ff ⊙ act(W1 x)) W2``.

One trainable vector ``ia3_l`` per adapted linear layer (W0: d_out x d_in, bias b), ones at init:

    other targets (k_proj, v_proj):     y = l ⊙ (W0 x + b)     l: d_out, stored (d_out, 1)
    feed-forward targets (down_proj):   y = W0 (l ⊙ x) + b     l: d_in,  stored (1, d_in)

Scaling down_proj's input is scaling the MLP's intermediate activation ``act(gate(x)) * up(x)``.

Merge folds l into W0's rows (``diag(l) W0``, and ``l ⊙ b``) or columns (``W0 diag(l)``). Unmerge divides by
the vector the merge used, in fp32. A scale with |l| < ``MIN_SCALE`` cannot be divided out (0 erases its row;
a tiny one can push the product into subnormals, as PEFT's ``+ 1e-8`` would skew it), so merge copies those
rows or columns (and bias entries) aside and unmerge puts the copies back unchanged. The saved adapter uses
PEFT's layout (``base_model.model.<module>.ia3_l``), so PEFT and lmadapt load each other's files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, load_tensors, peft_targets
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    name_matches,
    plain_linear,
    replace_module,
)

MIN_SCALE = 1e-4  # |l| below this: merge keeps the original row/column instead of dividing it back out


@dataclass
class IA3Config:
    target_modules: list[str] = option(
        ["k_proj", "v_proj", "down_proj"],
        "Linear layers to rescale: trailing dotted names ('v_proj', 'self_attn.v_proj'), 're:<regex>' on the "
        "full name, or 'all-linear'. PEFT's default for Llama.")
    feedforward_modules: list[str] = option(
        ["down_proj"],
        "Those targets whose INPUT is scaled (l: d_in); every other target has its OUTPUT scaled (l: d_out). "
        "Each entry must select at least one target; [] when none is a feed-forward layer.")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    init: Literal["ones", "random"] = option(
        "ones", "ones: every scale 1, so the model is unchanged at init (PEFT's default); random: standard normal, "
                "as PEFT's init_ia3_weights=false (not identity at init; for tests).")

    def check(self) -> list[str]:
        problems = []
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [k_proj, v_proj, down_proj]")
        return problems


class IA3Linear(nn.Module):
    """A linear layer whose output (or, for a feed-forward layer, input) is multiplied by the vector ``ia3_l``.

    Holds the original ``weight``/``bias`` Parameters under the same names, so the base model's state-dict keys do
    not change. ``ia3_l`` is kept in fp32 and cast to the activations' dtype (or the autocast dtype) per call.
    """

    casts_own_parameters = True

    def __init__(self, base: nn.Linear, feedforward: bool, init: str = "ones") -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes
        start = torch.randn(shape) if init == "random" else torch.ones(shape)
        self.ia3_l = nn.Parameter(start.to(base.weight.device))
        # set by merge(): the fp32 vector merged in, and the rows/columns (bias entries) it cannot divide back out.
        # Plain attributes, not buffers: outside the state dict, and a later model.to(bf16) cannot round them.
        self.merged_scale: torch.Tensor | None = None
        self.kept_weight: torch.Tensor | None = None
        self.kept_bias: torch.Tensor | None = None
        self._enabled = True
        self._merged = False

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs, merged or not."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def _slices(self, weight: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        """The scaled rows (output scaling) or columns (feed-forward) of ``weight`` selected by ``small``."""
        return weight[:, small] if self.feedforward else weight[small]

    def merge(self) -> None:
        """W <- diag(l) W0 and b <- l ⊙ b (feed-forward: W <- W0 diag(l)); a no-op when merged already."""
        if self._merged:
            return
        scale = self.ia3_l.detach().float().clone()
        if not torch.isfinite(scale).all():
            raise LmadaptError(f"ia3_l of a {self.in_features}->{self.out_features} layer has NaN or infinite "
                               f"entries, so training diverged; it was not merged: use an earlier checkpoint")
        small = scale.flatten().abs() < MIN_SCALE
        with torch.no_grad():
            self.kept_weight = self._slices(self.weight, small).clone()
            if self.bias is not None and not self.feedforward:
                self.kept_bias = self.bias[small].clone()
                self.bias.copy_(self.bias.float() * scale.flatten())
            self.weight.copy_(self.weight.float() * scale)
        self.merged_scale = scale
        self._merged = True

    def _base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0, b0) recovered from the merged weight: divided by the merged vector in fp32, the kept slices put back."""
        scale = self.merged_scale.to(self.weight.device)
        small = scale.flatten().abs() < MIN_SCALE
        divisor = torch.where(scale.abs() < MIN_SCALE, torch.ones_like(scale), scale)
        weight = (self.weight.float() / divisor).to(self.weight.dtype)
        kept = self.kept_weight.to(weight)
        if self.feedforward:
            weight[:, small] = kept
        else:
            weight[small] = kept
        bias = self.bias
        if bias is not None and not self.feedforward:
            bias = (bias.float() / divisor.flatten()).to(bias.dtype)
            bias[small] = self.kept_bias.to(bias)
        return weight, bias

    def unmerge(self) -> None:
        """Undo :meth:`merge` (a no-op when not merged)."""
        if not self._merged:
            return
        with torch.no_grad():
            weight, bias = self._base_tensors()
            self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.copy_(bias)
        self.merged_scale = self.kept_weight = self.kept_bias = None
        self._merged = False

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (a merged vector included)."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._enabled == self._merged:  # the stored weight is already the one this call wants
            return F.linear(x, self.weight, self.bias)
        if self._merged:  # switched off while merged: the base weight, rebuilt for this call
            with torch.no_grad():
                weight, bias = self._base_tensors()
            return F.linear(x, weight, bias)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        scale = self.ia3_l.flatten().to(dtype)
        if self.feedforward:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    def extra_repr(self) -> str:
        scaled = f"input ({self.in_features})" if self.feedforward else f"output ({self.out_features})"
        return f"in={self.in_features}, out={self.out_features}, scales={scaled}"


def _peft_feedforward(patterns: list[str], names: list[str] | None, ff_names: list[str] | None,
                      peft_target: Any) -> Any:
    """PEFT's ``feedforward_modules``: our list when PEFT (suffix match, a subset of a target list) would pick the
    same layers with it, else an exact-match regex of the feed-forward layers."""
    plain = all(not p.startswith("re:") for p in patterns)
    if names is None or ff_names is None:
        if plain:
            return sorted(patterns)
        raise ValueError("apply() the method before asking for its PEFT config")
    same = {n for n in names if n.endswith(tuple(patterns))} == set(ff_names)
    if plain and same and (isinstance(peft_target, str) or set(patterns) <= set(peft_target)):
        return sorted(patterns)
    return "^(" + "|".join(re.escape(n) for n in ff_names) + ")$" if ff_names else []


@register
class IA3(Method):
    """(IA)^3 (Liu et al., arXiv:2205.05638): y = l ⊙ (W0 x + b), or y = W0 (l ⊙ x) + b for feed-forward layers."""

    name = "ia3"
    config_class = IA3Config
    peft_type = "IA3"
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, types=(nn.Linear,), exclude=cfg.exclude_modules)
        names = [n for n, _ in targets]
        stray = [p for p in cfg.feedforward_modules if not any(name_matches(n, p) for n in names)]
        if stray:
            raise LmadaptError(
                f"feedforward_modules {', '.join(map(repr, stray))} select(s) none of the {len(names)} adapted "
                f"module(s) (e.g. {names[0]}); a feed-forward module must also be a target: add it to "
                f"target_modules, fix the name, or set feedforward_modules: [] if no target is a feed-forward layer")
        self.module_names = names
        self.feedforward_names = [n for n in names if any(name_matches(n, p) for p in cfg.feedforward_modules)]
        for n, module in targets:
            replace_module(model, n, IA3Linear(module, n in self.feedforward_names, cfg.init))

    def _layers(self, model: nn.Module) -> list[tuple[str, IA3Linear]]:
        return list(modules_of_type(model, IA3Linear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        # no weight decay: it would pull every scale towards 0 (a channel switched off), not towards the identity 1
        return [ParamGroup("ia3", [m.ia3_l for _, m in self._layers(model)], weight_decay=0.0)]

    def merge(self, model: nn.Module) -> None:
        """Fold every vector into its weight; refuses (merging nothing) when a vector holds NaN or inf."""
        layers = self._layers(model)
        bad = [n for n, m in layers if not torch.isfinite(m.ia3_l.detach()).all()]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise LmadaptError(f"ia3_l of {bad[0]}{more} has NaN or infinite entries, so training diverged; "
                               f"nothing was merged: use an earlier checkpoint or a lower learning rate")
        for _, m in layers:
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back (a merged vector stays in the weights)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{n}.ia3_l": m.ia3_l.detach() for n, m in self._layers(model)}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors({f"{PEFT_PREFIX}{n}.ia3_l": m.ia3_l for n, m in self._layers(model)}, state,
                     "a different base model, or a layer that is feed-forward in one and not in the other: check "
                     "feedforward_modules")

    def adapter_config(self) -> dict[str, Any]:
        cfg = self.config
        names = getattr(self, "module_names", None)
        target = peft_targets(cfg.target_modules, names, cfg.exclude_modules)
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": target,
            "feedforward_modules": _peft_feedforward(cfg.feedforward_modules, names,
                                                     getattr(self, "feedforward_names", None), target),
            "exclude_modules": None,  # folded into target_modules by peft_targets
            "fan_in_fan_out": False,
            "init_ia3_weights": cfg.init == "ones",
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        unsupported = {
            "fan_in_fan_out": bool(peft.get("fan_in_fan_out")),  # GPT-2-style Conv1D layers
            "modules_to_save": bool(peft.get("modules_to_save")),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"this PEFT IA3 adapter uses {', '.join(bad)}, which lmadapt's ia3 does not support "
                             f"(it adapts nn.Linear layers and saves only the ia3_l vectors); merge it with PEFT "
                             f"and load the merged model instead")
        targets = peft.get("target_modules")
        if not targets:
            raise ValueError("target_modules is empty; name the adapted modules in adapter_config.json")
        feedforward = peft.get("feedforward_modules")
        if feedforward is None:
            raise ValueError("feedforward_modules is missing (PEFT fills it in from the model type when it saves); "
                             "name the feed-forward targets in adapter_config.json, e.g. [\"down_proj\"] for Llama, "
                             "or [] for none")
        if isinstance(targets, str):
            targets = [targets] if targets == "all-linear" else [f"re:{targets}"]
        if isinstance(feedforward, str):
            feedforward = [f"re:{feedforward}"]
        exclude = peft.get("exclude_modules") or []
        if isinstance(exclude, str):
            exclude = [f"re:{exclude}"]
        return {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
                "exclude_modules": list(exclude),
                "init": "ones" if peft.get("init_ia3_weights", True) else "random"}
