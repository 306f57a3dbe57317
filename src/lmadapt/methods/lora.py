"""LoRA: low-rank adaptation of linear layers.

"LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685;
rsLoRA scaling from "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski,
arXiv:2312.03732.

    y = W0 x + b + s * B A dropout(x),   A: r x d_in,  B: d_out x r,
    s = alpha / r   (alpha / sqrt(r) with rsLoRA)

Merge: W = W0 + s B A.  Unmerge: W0 = W - s B A.  The saved adapter uses PEFT's layout
(``base_model.model.<module>.lora_A.weight``), so PEFT and lmadapt load each other's files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    replace_module,
)

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    r: int = option(8, "Rank of the update B A.")
    alpha: float = option(16.0, "Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = option(0.0, "Dropout on the adapter's input (training only).")
    rslora: bool = option(False, "Use the rank-stabilised scale alpha/sqrt(r).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj', 'self_attn.q_proj'), 're:<regex>' on "
        "the full name, or 'all-linear' (every linear layer but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    init: Literal["default", "gaussian", "random"] = option(
        "default", "default: A Kaiming-uniform, B = 0 (PEFT's default); gaussian: A ~ N(0, 1/r), B = 0; "
        "random: B random too (not identity at init; for tests).")
    lr_ratio_b: float = option(1.0, "Learning-rate multiplier for B relative to A (LoRA+ uses ~16).")

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraLinear(nn.Module):
    """A linear layer plus a low-rank update. Holds the original ``weight``/``bias`` Parameters under the
    same names, so the base model's state-dict keys do not change."""

    casts_own_parameters = True  # the fp32 factors run in the activations' dtype (see _factors)

    def __init__(self, base: nn.Linear, cfg: LoraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, **factory))
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.merged = False
        self._cached: tuple | None = None  # inference-time cast factors, see _factors
        self.reset_adapter(cfg.init)

    def reset_adapter(self, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.lora_A.shape[0])
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s * B A, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged == self.adapter_enabled:  # the weight already holds what this call needs
            return F.linear(x, self.weight, self.bias)
        # Unmerged and on: add s B A dropout(x). Merged but switched off (adapters_disabled): take s B A x
        # back out, so the base model's outputs come back without unmerging.
        h = self.dropout(x) if self.adapter_enabled and self.training else x
        a, bt = self._factors(x.dtype)
        out = F.linear(x, self.weight, self.bias)
        # out + (h A^T) (s B)^T as one GEMM with accumulate: no separate scale and add over the activations
        low = F.linear(h, a).reshape(-1, a.shape[0])
        if torch.is_grad_enabled():
            return torch.addmm(out.reshape(-1, self.out_features), low, bt).view(out.shape)
        out.view(-1, self.out_features).addmm_(low, bt)  # no autograd: accumulate into the fresh output
        return out

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, (s B)^T) in the dtype the adapter runs in (-s B when the adapter is being taken out of a merge).

        The factors are cast to the activations' dtype (an r x d copy), never the activations to the
        factors' fp32: under autocast that is bf16/fp16; without it, the model's own dtype. Outside
        autograd (generation, evaluation) the cast factors are cached, (s B)^T contiguous, until the
        parameters change: decoding one token is a few microseconds of work per layer, so what the
        adapter costs there is mostly per-call overhead.
        """
        device_type = self.lora_A.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        scale = self.scaling if self.adapter_enabled else -self.scaling
        if torch.is_grad_enabled():
            return self.lora_A.to(dtype), (self.lora_B * scale).to(dtype).t()
        key = (self.lora_A._version, self.lora_B._version, dtype, scale)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self.lora_A.to(dtype), (self.lora_B * scale).to(dtype).t().contiguous())
        return self._cached[1], self._cached[2]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _restore_linear(module: LoraLinear) -> nn.Linear:
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device="meta")
    plain.weight = module.weight
    if module.bias is not None:
        plain.bias = module.bias
    return plain


@register
class Lora(Method):
    """Low-rank adaptation (Hu et al., arXiv:2106.09685): y = W0 x + s B A x."""

    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        freeze_all(model)
        cfg = self.config
        targets = find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)
        self.module_names = [name for name, _ in targets]
        for name, linear in targets:
            replace_module(model, name, LoraLinear(linear, cfg))

    def _layers(self, model: nn.Module) -> list[tuple[str, LoraLinear]]:
        return list(modules_of_type(model, LoraLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = self._layers(model)
        a = [m.lora_A for _, m in layers]
        b = [m.lora_B for _, m in layers]
        if self.config.lr_ratio_b == 1.0:
            return [ParamGroup("lora", a + b)]
        return [ParamGroup("lora_A", a), ParamGroup("lora_B", b, lr_scale=self.config.lr_ratio_b)]

    def merge(self, model: nn.Module) -> None:
        with torch.no_grad():
            for _, m in self._layers(model):
                if not m.merged:
                    m.weight += m.delta_weight().to(m.weight.dtype)
                    m.merged = True

    def unmerge(self, model: nn.Module) -> None:
        with torch.no_grad():
            for _, m in self._layers(model):
                if m.merged:
                    m.weight -= m.delta_weight().to(m.weight.dtype)
                    m.merged = False

    def unload(self, model: nn.Module) -> None:
        for name, m in self._layers(model):
            replace_module(model, name, _restore_linear(m))

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self._layers(model):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        layers = dict(self._layers(model))
        expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise KeyError(_key_mismatch(missing, unexpected))
        with torch.no_grad():
            for name, m in layers.items():
                for ab in "AB":
                    src = state[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                    dst = getattr(m, f"lora_{ab}")
                    if src.shape != dst.shape:
                        raise ValueError(f"{name}.lora_{ab}: saved shape {tuple(src.shape)} != "
                                         f"model's {tuple(dst.shape)} (different base model or rank?)")
                    dst.copy_(src)

    def adapter_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora,
            "target_modules": _peft_targets(cfg.target_modules, getattr(self, "module_names", None),
                                            cfg.exclude_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        unsupported = {
            "use_dora": bool(peft.get("use_dora")),
            "rank_pattern": bool(peft.get("rank_pattern")),
            "alpha_pattern": bool(peft.get("alpha_pattern")),
            "modules_to_save": bool(peft.get("modules_to_save")),
            "layers_to_transform": peft.get("layers_to_transform") is not None,
            "fan_in_fan_out": bool(peft.get("fan_in_fan_out")),
            "bias": peft.get("bias", "none") != "none",
            # same tensor names as plain LoRA but a different forward, or tensors lmadapt has no place for
            "lora_bias": bool(peft.get("lora_bias")),
            "alora_invocation_tokens": bool(peft.get("alora_invocation_tokens")),
            "layer_replication": bool(peft.get("layer_replication")),
            "target_parameters": bool(peft.get("target_parameters")),
            "trainable_token_indices": bool(peft.get("trainable_token_indices")),
            # PiSSA/OLoRA/CorDA/LoftQ inits rewrite the base weights; such a file needs that rewritten base
            "init_lora_weights": str(peft.get("init_lora_weights")).startswith(("pissa", "olora", "corda", "loftq")),
            **{k: peft.get(k) is not None
               for k in ("use_bdlora", "kasa_config", "arrow_config", "monteclora_config")},
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"this PEFT LoRA adapter uses {', '.join(bad)}, which lmadapt's lora does not "
                             f"support yet; merge it with PEFT and load the merged model instead")
        targets = peft.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets] if targets == "all-linear" else [f"re:{targets}"]
        exclude = peft.get("exclude_modules") or []
        if isinstance(exclude, str):
            exclude = [f"re:{exclude}"]
        return {"r": int(peft["r"]), "alpha": float(peft.get("lora_alpha", 8)),
                "dropout": float(peft.get("lora_dropout", 0.0)), "rslora": bool(peft.get("use_rslora")),
                "target_modules": sorted(targets), "exclude_modules": list(exclude)}


def _peft_targets(targets: list[str], names: list[str] | None, exclude: list[str]) -> Any:
    """PEFT's ``target_modules``: the same list when it has PEFT's meaning, else an exact-match regex."""
    plain = all(not t.startswith("re:") for t in targets)
    if plain and not exclude and ("all-linear" not in targets or len(targets) == 1):
        return "all-linear" if targets == ["all-linear"] else sorted(targets)
    if not names:
        raise ValueError("apply() the method before asking for its PEFT config")
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _key_mismatch(missing: set[str], unexpected: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} adapter tensor(s) missing, e.g. {sorted(missing)[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {sorted(unexpected)[0]}")
    return "; ".join(parts) + " (was the adapter trained on a model with other module names?)"
