"""The linear head that the head objectives (``classify``, ``tag``) put on a decoder LM, and the options they share.

LS-LLaMA (Li et al., "Label Supervised LLaMA Finetuning", arXiv:2310.01208) sets the LM head aside and reads a
final hidden state h (after the final norm) with ``score = Linear(d, C, bias=False)``: ``z = W h``. ``classify``
feeds it a pooled state per sequence, ``tag`` every token's state. Both can remove the causal mask in chosen
decoder layers (LS-unLLaMA: all; "Do Not (Always) Look Right", Dukić & Šnajder, arXiv:2401.14556: the last k),
padding still masked (:mod:`lmadapt.models.unmask`).

The head is the model's ``score`` attribute (the name transformers' ``*ForSequenceClassification`` and
``*ForTokenClassification`` use), fp32, trained in its own parameter group and saved with the adapter under
``lmadapt_objective.score.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import ParamGroup
from lmadapt.models.unmask import num_layers, resolve_layers, unmask_layers

HEAD = "score"  # the head's attribute on the model (as transformers' LlamaFor*Classification names it)


class ScoreHead(nn.Linear):
    """``Linear(d, C, bias=False)`` with fp32 weights, computed in fp32 whatever the activations' dtype (bf16
    logits would round the loss; the head is small)."""

    casts_own_parameters = True  # no autocast needed on its account (lmadapt.training.precision)

    def __init__(self, hidden_size: int, num_labels: int, device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_labels, bias=False, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


@dataclass
class HeadOptions:
    """The fields every head objective's config has (its own config adds the rest)."""

    unmask_layers: Literal["none", "all"] | list[int] = option(
        "none", "Decoder layers whose causal mask is removed (bidirectional attention, pads still masked): none, "
                "all (LS-unLLaMA), or a list of layer indices (negative: from the end).")
    unmask_last: int = option(0, "Also remove the causal mask in the last k decoder layers (\"Do Not (Always) "
                                 "Look Right\": the layers near the output help most).")
    head_lr_ratio: float = option(1.0, "The head's learning rate as a multiple of train.lr.")

    @property
    def unmasks(self) -> bool:
        """Whether any layer loses its causal mask."""
        return self.unmask_layers == "all" or self.unmask_last > 0 or (
            isinstance(self.unmask_layers, list) and bool(self.unmask_layers))

    def head_problems(self) -> list[str]:
        """Problems of the shared fields, each starting with the field name."""
        problems = []
        if self.unmask_last < 0:
            problems.append(f"unmask_last: must be >= 0, got {self.unmask_last}")
        if self.head_lr_ratio <= 0:
            problems.append(f"head_lr_ratio: must be > 0, got {self.head_lr_ratio}")
        return problems


def attach_head(model: nn.Module, outputs: int, options: HeadOptions, objective: str) -> ScoreHead:
    """The model's ``score`` head with ``outputs`` outputs, added (initialised N(0, initializer_range)) when the
    model has none, and the layers ``options`` name unmasked (replacing an earlier choice)."""
    head = getattr(model, HEAD, None)
    if not isinstance(head, ScoreHead):
        if head is not None:
            raise LmadaptError(f"the model already has a module named {HEAD!r} ({type(head).__name__}); the "
                               f"{objective} objective adds its head there: load a causal LM (…ForCausalLM)")
        embeddings = model.get_input_embeddings().weight
        head = ScoreHead(embeddings.shape[1], outputs, device=embeddings.device)
        nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
        head.train(model.training)
        model.add_module(HEAD, head)
    elif head.out_features != outputs:
        raise LmadaptError(f"the model already carries a {HEAD!r} head with {head.out_features} outputs; the "
                           f"{objective} objective needs {outputs}: load a fresh model")
    unmask_layers(model, resolve_layers(options.unmask_layers, options.unmask_last, num_layers(model)))
    return head


def head_group(model: nn.Module, name: str, lr_ratio: float) -> ParamGroup:
    """The head's parameter group (no weight decay)."""
    return ParamGroup(name, list(getattr(model, HEAD).parameters()), lr_scale=lr_ratio, weight_decay=0.0)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors, keyed as the adapter stores them (under ``lmadapt_objective.``)."""
    return {f"{HEAD}.weight": getattr(model, HEAD).weight.detach()}


def load_head_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy what :func:`head_state` saved into the attached head; a shape mismatch raises ValueError."""
    head = getattr(model, HEAD)
    weight = state[f"{HEAD}.weight"]
    if weight.shape != head.weight.shape:
        raise ValueError(f"{HEAD}.weight has shape {tuple(weight.shape)}, the head {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(weight)


__all__ = ["HEAD", "HeadOptions", "ScoreHead", "attach_head", "head_group", "head_state", "load_head_state"]
