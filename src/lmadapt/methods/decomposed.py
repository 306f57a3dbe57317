"""LoRA started from a decomposition of the base weight: what PiSSA, OLoRA and CorDA share.

Each of them picks factors (A0, B0) from the pretrained weight, starts the adapter there and freezes the
residual in the layer (PEFT's convention, :meth:`lmadapt.methods.lora_layer.LoraLinear.start_from`)::

    W_res = W0 - s B0 A0        y = W_res x + b + s B A dropout(x),   A = A0, B = B0 at the start

so outputs are unchanged at init, and training is ordinary LoRA on (A, B). The frozen (A0, B0) stay in the
layer: switching the adapter off (``adapters_disabled``) gives W0's outputs, which BA-LoRA and recovery
distillation need, and unloading an unmerged adapter restores W0.

Two saved forms:

- the own form (checkpoints, and the final adapter with ``export: false``): A, B and the start (A0, B0)
  under ``<module>.init_lora_A.weight`` / ``init_lora_B.weight``. Loading redoes the decomposition on the
  unmodified base and then re-bases the residual on the saved start, so it is exact even where the
  decomposition differs in the last bits; lmadapt alone reads it;
- the portable form (:meth:`DecomposedLora.export`, the run's final adapter by default): the change
  ``s (B A - B0 A0)`` as a plain LoRA of the *original* base with rank 2r,
  ``A' = [A; A0]``, ``B' = [B, -B0]`` and alpha scaled so that s stays the same — PEFT's
  ``path_initial_model_for_weight_conversion`` conversion. PEFT, vLLM and lmadapt's ``lora`` load it on
  the unmodified base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method
from lmadapt.methods.lora import PEFT_PREFIX, Lora, key_mismatch
from lmadapt.methods.lora_layer import LowRankConfig
from lmadapt.methods.registry import build_method

INIT_KEYS = ("init_lora_A", "init_lora_B")  # the start (A0, B0) in the own form: <module>.<key>.weight


@dataclass
class DecomposedConfig(LowRankConfig):
    export: bool = option(
        True, "Write the run's final adapter as a plain LoRA of the unmodified base (rank 2r: the change since the "
        "start), which PEFT, vLLM and lmadapt's lora load; false: the own form (lmadapt only).")


class DecomposedLora(Lora):
    """LoRA whose factors start from a decomposition of W0 (subclasses say which, in :meth:`decompose`).

    Not a reusable named adapter (its layers hold a rewritten base weight), and the own saved form is
    lmadapt's: :meth:`export` gives the portable one.
    """

    peft_type = None
    named_adapters = False
    rewrites_base_weights = True

    def decompose(self, module_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0: r x d_in, B0: d_out x r) for the module's fp32 weight ``weight`` (d_out x d_in), such that
        ``s B0 A0`` is the part the adapter takes over; None: no start is known yet (a load brings it)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> None:
        super().apply(model)
        for name, layer in self._layers(model):
            if self.config.r > min(layer.in_features, layer.out_features):
                raise LmadaptError(f"method {self.name}: {name} is {layer.out_features} x {layer.in_features}, "
                                   f"narrower than r={self.config.r}; choose r <= "
                                   f"{min(layer.in_features, layer.out_features)} or leave it out (exclude_modules)")
            with torch.no_grad():
                start = self.decompose(name, layer.weight.detach().float())
            if start is None:  # e.g. CorDA without calibration: the own form's load_adapter_state sets it
                f = layer.factors(self.adapter_name)
                start = torch.zeros_like(f.lora_A), torch.zeros_like(f.lora_B)
            layer.start_from(self.adapter_name, *start)

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state(model)
        for name, layer in self._layers(model):
            state[f"{PEFT_PREFIX}{name}.{INIT_KEYS[0]}.weight"] = layer.residual.lora_A.detach()
            state[f"{PEFT_PREFIX}{name}.{INIT_KEYS[1]}.weight"] = layer.residual.lora_B.detach()
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The saved start first (the residual is re-based on it, exactly), then the trained factors."""
        layers = dict(self._layers(model))
        starts = {f"{PEFT_PREFIX}{n}.{k}.weight" for n in layers for k in INIT_KEYS}
        missing = starts - state.keys()
        if missing:
            raise KeyError(key_mismatch(missing, set()) + f" (a {self.name!r} adapter in lmadapt's own form "
                           f"saves its start; a file written with export: true is a plain lora adapter)")
        for name, layer in layers.items():
            a0 = state[f"{PEFT_PREFIX}{name}.{INIT_KEYS[0]}.weight"]
            b0 = state[f"{PEFT_PREFIX}{name}.{INIT_KEYS[1]}.weight"]
            f = layer.factors(self.adapter_name)
            if a0.shape != f.lora_A.shape or b0.shape != f.lora_B.shape:
                raise ValueError(f"{name}: saved start has shapes {tuple(a0.shape)}/{tuple(b0.shape)}, the model's "
                                 f"adapter {tuple(f.lora_A.shape)}/{tuple(f.lora_B.shape)} (another rank or base?)")
            layer.start_from(self.adapter_name, a0, b0)
        super().load_adapter_state(model, {k: v for k, v in state.items() if k not in starts})

    def adapter_config(self) -> dict[str, Any]:
        return {}  # the own form is lmadapt's (its record); export() writes PEFT's LoRA config

    @classmethod
    def claims_peft(cls, peft_config: dict[str, Any]) -> bool:
        return False

    def export(self, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]] | None:
        """The change since the start, ``s (B A - B0 A0)``, as a plain rank-2r LoRA of the unmodified base."""
        if not self.config.export:
            return None
        cfg = self.config
        alpha = cfg.alpha * (math.sqrt(2) if cfg.rslora else 2)  # alpha'/r' (or /sqrt(r')) == alpha/r
        plain = build_method({"name": "lora", "r": 2 * cfg.r, "alpha": alpha, "dropout": cfg.dropout,
                              "rslora": cfg.rslora, "target_modules": list(cfg.target_modules),
                              "exclude_modules": list(cfg.exclude_modules)})
        plain.module_names = list(self.module_names)
        state = {}
        for name, layer in self._layers(model):
            f, r = layer.factors(self.adapter_name), layer.residual
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([f.lora_A.detach(), r.lora_A], 0)
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat([f.lora_B.detach(), -r.lora_B], 1)
        return plain, state

