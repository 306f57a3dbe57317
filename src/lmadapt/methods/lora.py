"""LoRA: low-rank adaptation of linear layers.

"LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685;
rsLoRA scaling from "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski,
arXiv:2312.03732.

    y = W0 x + b + s * B A dropout(x),   A: r x d_in,  B: d_out x r,
    s = alpha / r   (alpha / sqrt(r) with rsLoRA)

Merge: W = W0 + s B A.  Unmerge: W0 = W - s B A.  The saved adapter uses PEFT's layout
(``base_model.model.<module>.lora_A.weight``), so PEFT and lmadapt load each other's files.

A model may hold several named LoRA adapters (one :class:`Lora` object per name; the layer is
:class:`lmadapt.methods.lora_layer.LoraLinear`). The one named ``"default"`` is what training sees;
further ones are frozen unless asked otherwise. :mod:`lmadapt.adapters.pool` chooses which are active.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmadapt.errors import AdapterError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora_layer import DEFAULT_ADAPTER, LoraConfig, LoraLinear
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    replace_module,
)

PEFT_PREFIX = "base_model.model."




@register
class Lora(Method):
    """Low-rank adaptation (Hu et al., arXiv:2106.09685): y = W0 x + s B A x."""

    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    mergeable = True
    named_adapters = True

    def __init__(self, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER,
                 trainable: bool | None = None) -> None:
        super().__init__(config)
        self.adapter_name = adapter_name  # which named adapter of the model this method object is
        self.trainable = trainable  # None: the default adapter trains, further named ones are frozen

    def apply(self, model: nn.Module) -> None:
        """Add this adapter to ``model``: the first one also freezes the base; a further one (another name)
        joins the existing LoRA layers, leaves the other parameters as they are and does not change
        which adapters are active."""
        cfg, name = self.config, self.adapter_name
        existing = [m for _, m in modules_of_type(model, LoraLinear)]
        if any(name in m.adapter_names for m in existing):
            raise AdapterError(f"the model already holds a LoRA adapter named {name!r}; delete it first "
                               f"(lmadapt.adapters.pool.delete_adapter) or load this one under another name")
        if not existing:
            freeze_all(model)
        active = existing[0].active_adapters if existing else (name,)
        trainable = name == DEFAULT_ADAPTER if self.trainable is None else self.trainable
        targets = find_modules(model, cfg.target_modules, types=(nn.Linear, LoraLinear), exclude=cfg.exclude_modules)
        self.module_names = [n for n, _ in targets]
        for n, module in targets:
            if isinstance(module, LoraLinear):
                module.add_adapter(name, cfg, trainable)
            else:
                layer = LoraLinear(module, cfg, name, trainable)
                layer.active_adapters = active
                replace_module(model, n, layer)

    def _layers(self, model: nn.Module) -> list[tuple[str, LoraLinear]]:
        """The LoRA layers that hold this adapter."""
        return [(n, m) for n, m in modules_of_type(model, LoraLinear) if self.adapter_name in m.adapter_names]

    def _factors(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m.factors(self.adapter_name)) for n, m in self._layers(model)]

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        factors = self._factors(model)
        a = [f.lora_A for _, f in factors]
        b = [f.lora_B for _, f in factors]
        if self.config.lr_ratio_b == 1.0:
            return [ParamGroup("lora", a + b)]
        return [ParamGroup("lora_A", a), ParamGroup("lora_B", b, lr_scale=self.config.lr_ratio_b)]

    def merge(self, model: nn.Module) -> None:
        """Fold this adapter into the weights; other named adapters stay unmerged and switchable."""
        for _, m in self._layers(model):
            m.merge_adapter(self.adapter_name)

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge_adapter(self.adapter_name)

    def unload(self, model: nn.Module) -> None:
        """Remove this adapter (a merged one stays in the weights); a layer left without adapters becomes
        a plain ``nn.Linear`` again."""
        for name, m in self._layers(model):
            m.remove_adapter(self.adapter_name)
            if not m.adapter_names:
                replace_module(model, name, m.as_linear())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This adapter's factors under PEFT's keys, whatever its name in the model."""
        state = {}
        for name, f in self._factors(model):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.lora_A.detach()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.lora_B.detach()
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors({f"{PEFT_PREFIX}{n}.lora_{ab}.weight": getattr(f, f"lora_{ab}")
                      for n, f in self._factors(model) for ab in "AB"}, state, "different base model or rank?")

    def adapter_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora,
            "target_modules": peft_targets(cfg.target_modules, getattr(self, "module_names", None),
                                            cfg.exclude_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def claims_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT "LORA" files, except DoRA's (``use_dora``), which the dora method reads."""
        return super().claims_peft(peft_config) and not peft_config.get("use_dora")

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
        if bad == ["init_lora_weights"]:
            raise ValueError(f"this PEFT LoRA adapter was saved with init_lora_weights="
                             f"{peft.get('init_lora_weights')!r} without conversion, so it only works on the "
                             f"residual base weights PEFT saved beside it; save it again with PEFT's "
                             f"save_pretrained(..., path_initial_model_for_weight_conversion=...), which writes a "
                             f"plain LoRA of the original base that lmadapt loads (docs/methods/pissa.md)")
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


def peft_targets(targets: list[str], names: list[str] | None, exclude: list[str]) -> Any:
    """PEFT's ``target_modules``: the same list when it has PEFT's meaning, else an exact-match regex."""
    plain = all(not t.startswith("re:") for t in targets)
    if plain and not exclude and ("all-linear" not in targets or len(targets) == 1):
        return "all-linear" if targets == ["all-linear"] else sorted(targets)
    if not names:
        raise ValueError("apply() the method before asking for its PEFT config")
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def load_tensors(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], hint: str, note: str = "") -> None:
    """Copy ``state`` into ``params`` (adapter key -> the tensor it fills). Refuses missing or unexpected keys
    (``note`` appended to the message) and any shape that differs (naming the tensor and ``hint``, the likely
    cause) before it changes anything, so a refused adapter leaves the model as it was."""
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(key_mismatch(missing, unexpected) + note)
    for key, p in params.items():
        if state[key].shape != p.shape:
            raise ValueError(f"{key.removeprefix(PEFT_PREFIX)}: saved shape {tuple(state[key].shape)} != model's "
                             f"{tuple(p.shape)} ({hint})")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


def key_mismatch(missing: set[str], unexpected: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} adapter tensor(s) missing, e.g. {sorted(missing)[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {sorted(unexpected)[0]}")
    return "; ".join(parts) + " (was the adapter trained on a model with other module names?)"

