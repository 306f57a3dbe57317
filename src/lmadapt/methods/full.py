"""Full fine-tuning: every weight of the model trains.

The "adapter" is the whole set of trained weights under the base model's own keys; merging is a no-op
because the weights are the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmadapt.config import option
from lmadapt.methods._weights import WeightsMethod, trainable_named
from lmadapt.methods.registry import register


@dataclass
class FullConfig:
    freeze_embeddings: bool = option(False, "Keep the input embeddings (and a tied output head) frozen.")


@register
class Full(WeightsMethod):
    """All parameters train (optionally all but the embeddings)."""

    name = "full"
    config_class = FullConfig

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        self.names = [n for n, _ in trainable_named(model)]
