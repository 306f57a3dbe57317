"""Full fine-tuning: every weight of the model trains.

The "adapter" is the whole set of trained weights under the base model's own keys; merging is a no-op
because the weights are the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.methods._weights import decay_groups, load_weights, trainable_named, weights_state
from lmadapt.methods.base import Method, ParamGroup, register



@dataclass
class FullConfig:
    freeze_embeddings: bool = option(False, "Keep the input embeddings (and a tied output head) frozen.")


@register
class Full(Method):
    """All parameters train (optionally all but the embeddings)."""

    name = "full"
    config_class = FullConfig
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        self.names = [n for n, _ in trainable_named(model)]

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return decay_groups(trainable_named(model))

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained weights are the model."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to undo."""

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return weights_state(model, self.names)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_weights(model, state)



