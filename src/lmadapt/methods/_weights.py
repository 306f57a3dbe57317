"""Shared by the methods that train the base model's own weights (full, freeze): the adapter file holds
those weights under their base-model keys, and loading writes them back."""

from __future__ import annotations

import torch
from torch import nn

from lmadapt.methods.base import Method, ParamGroup

NO_DECAY_MARKERS = ("bias", "norm", "embed")


def decay_groups(named: list[tuple[str, nn.Parameter]]) -> list[ParamGroup]:
    """Matrices get weight decay; biases, norms and embeddings do not (the nanoGPT/HF convention)."""
    decay = [p for n, p in named if p.ndim >= 2 and not any(k in n.lower() for k in NO_DECAY_MARKERS)]
    ids = {id(p) for p in decay}
    rest = [p for _, p in named if id(p) not in ids]
    groups = []
    if decay:
        groups.append(ParamGroup("decay", decay))
    if rest:
        groups.append(ParamGroup("no_decay", rest, weight_decay=0.0))
    return groups


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for each trainable parameter, tied parameters once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weights_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the model's parameters of the same names; refuse unknown names or shapes."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"{len(unknown)} saved tensor(s) name no parameter of this model, e.g. {unknown[0]}")
    with torch.no_grad():
        for name, src in state.items():
            dst = params[name]
            if dst.shape != src.shape:
                raise ValueError(f"{name}: saved shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
            dst.copy_(src)


class WeightsMethod(Method):
    """Shared by methods whose trained tensors are the base model's own weights (full, freeze).

    ``apply`` sets ``requires_grad`` and ``self.names``; saving writes those weights under their base
    keys, and merging has nothing to fold.
    """

    mergeable = True
    trains_base_weights = True
    names: list[str]

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
