"""Partial fine-tuning: train only chosen modules (the last N blocks, the norms, named layers), freeze the rest.

The adapter holds only the trained tensors, under the base model's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmadapt.config import option
from lmadapt.methods._weights import WeightsMethod, trainable_named
from lmadapt.methods.registry import register
from lmadapt.models.tree import find_modules, freeze_all, transformer_blocks


@dataclass
class FreezeConfig:
    last_n_layers: int = option(0, "Train the last N transformer blocks.")
    norms: bool = option(False, "Train every normalisation layer (RMSNorm/LayerNorm weights).")
    modules: list[str] = option([], "More modules to train, by trailing dotted name or 're:<regex>' "
                                    "(e.g. lm_head, embed_tokens, 're:.*layers\\.0\\.mlp').")

    def check(self) -> list[str]:
        if self.last_n_layers < 0:
            return [f"last_n_layers: must be >= 0, got {self.last_n_layers}"]
        if not (self.last_n_layers or self.norms or self.modules):
            return ["last_n_layers: nothing would train; set last_n_layers, norms or modules"]
        return []


@register
class Freeze(WeightsMethod):
    """Train the chosen modules only."""

    name = "freeze"
    config_class = FreezeConfig

    def apply(self, model: nn.Module) -> None:
        freeze_all(model)
        cfg = self.config
        chosen: list[nn.Module] = []
        if cfg.last_n_layers:
            blocks = transformer_blocks(model)
            if len(blocks) < cfg.last_n_layers:
                raise ValueError(f"method.last_n_layers={cfg.last_n_layers} but the model has {len(blocks)} blocks")
            chosen += [model.get_submodule(n) for n in blocks[-cfg.last_n_layers:]]
        if cfg.norms:
            chosen += [m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
        if cfg.modules:
            chosen += [m for _, m in find_modules(model, cfg.modules, types=(nn.Module,))]
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
        self.names = [n for n, _ in trainable_named(model)]
