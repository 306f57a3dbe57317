"""The objective interface: what the loop minimises, and the registry that finds an objective by name.

An objective is one file that defines a config dataclass and an :class:`Objective` subclass decorated
with :func:`register_objective`. The loop knows nothing about any particular objective; per micro-batch it
asks it how many units carry loss (:meth:`Objective.count`, summed over the whole optimizer step, and over
every process under DDP) and for the summed loss (:meth:`Objective.loss`), and divides the one by the other,
so every unit weighs the same however the step is split::

    objective = build_objective({"name": "causal_lm"})
    method.apply(model); objective.setup(model, tokenizer, device)   # load a teacher; its heads train
    groups += objective.parameter_groups(model)       # heads it trains (value head, classifier)
    for each micro-batch mb of a step:
        n_step = sum(objective.count(mb) for mb in step)
        out = objective.loss(model, mb, drop_padding_mask=...)      # LossOutput(loss_sum, count, outputs)
        (out.loss / n_step).backward()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lmadapt.methods.base import ParamGroup
from lmadapt.registry import Registry


@dataclass
class LossOutput:
    """What one micro-batch's loss is made of."""

    loss: torch.Tensor  # summed over the units the objective counts (not averaged)
    count: int  # how many units the sum covers (target tokens, states, sequences)
    outputs: Any = None  # the model's output: ``.logits`` at ``.logit_positions`` (None: every position)
    metrics: dict[str, float] = field(default_factory=dict)  # detached sums over the same units, for the log


class Objective:
    """Base of all objectives. Subclasses set ``name`` and ``config_class`` and implement :meth:`count`
    and :meth:`loss`; the other hooks have neutral defaults."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    # The model attends causally (no position sees a later one). Only then may a right-padding mask be dropped
    # (the loop also asks every active method, see Method.causal_attention).
    causal_attention: ClassVar[bool] = True

    # The data format whose rows this objective trains on (``preference`` pairs, ``classification`` labels), or
    # None: token sequences (text, prompt_completion, instruction, chat). See :meth:`data_problems`.
    data_format: ClassVar[str | None] = None

    # What validation reports besides ``val_loss`` (the mean loss per unit): "ppl", exp(val_loss), meaningful where
    # the loss is a mean next-token cross-entropy; and keys of LossOutput.metrics, as ``val_<key>``: their sums
    # over the held-out units divided by the units (dpo: reward accuracy and margin per pair).
    validation_metrics: ClassVar[tuple[str, ...]] = ("ppl",)

    def __init__(self, config: Any) -> None:
        self.config = config

    def data_problems(self, report: Any, data: Any) -> list[str]:
        """Why the training data (``report``: the :class:`lmadapt.data.DataReport` of the loaded splits, its
        ``format`` resolved, never ``auto``) and the ``data:`` section ``data`` do not fit this objective: checked
        before the run writes anything. A format that another objective owns (preference pairs for ``dpo``) would
        silently train as something else here."""
        data_format = report.format
        if self.data_format is not None and data_format != self.data_format:
            return [f"objective {self.name!r} trains on data.format {self.data_format!r} rows, but the training data "
                    f"reads as {data_format!r}; set data.format: {self.data_format} and give rows of that form "
                    "(docs/data.md)"]
        if self.data_format is None:
            owners = {c.data_format: c.name for c in map(OBJECTIVES.get, OBJECTIVES.names()) if c.data_format}
            if data_format in owners:
                return [f"the training data are {data_format!r} rows, which objective {owners[data_format]!r} trains "
                        f"on, but the objective is {self.name!r} (it would train on them as plain sequences); set "
                        f"objective.name: {owners[data_format]}"]
        return []

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        """Prepare before training, after the method is applied (so what the objective trains wins): load a
        teacher, make the heads the objective trains trainable. An objective that adds heads to the model
        creates them in :meth:`attach` and calls it from here."""

    def attach(self, model: nn.Module) -> None:
        """Add the modules (heads) this objective owns to ``model``, on the model's device and dtype; nothing
        else. Called by :meth:`setup`, and when an adapter that saved the heads is loaded (without
        :meth:`setup`: no teacher, no data), before :meth:`load_trainable_state` overwrites their values.
        The default adds nothing (the value objective's head is part of its ValueModel)."""

    def begin_step(self, step: int, total: int) -> None:
        """Called by the loop before optimizer step ``step`` (0-based; a resumed run passes its restored count) of
        ``total``: an objective that changes over training reads the step here, so it is exact under resume.
        Nothing by default."""

    def count(self, batch: dict[str, Any]) -> int:
        """Units of ``batch`` that carry loss (computed before the forward pass, from the batch alone)."""
        raise NotImplementedError(f"objective {self.name!r} must implement count()")

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        """The loss summed over this micro-batch's units. ``drop_padding_mask``: the loop found that a mask
        which only marks right padding changes nothing that carries loss (causal attention everywhere)."""
        raise NotImplementedError(f"objective {self.name!r} must implement loss()")

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        """Parameters the objective itself trains (heads), each in exactly one group; none by default."""
        return []

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of the parameters in :meth:`parameter_groups`, keyed stably: checkpoints save them, and so do
        adapter folders (under ``lmadapt_objective.<key>``, see :func:`lmadapt.adapters.format.save_adapter`)."""
        return {}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state` saved into the heads (after :meth:`attach`); a mismatch raises."""


OBJECTIVES: Registry[Objective] = Registry("objective", default="causal_lm")
register_objective = OBJECTIVES.register
available_objectives = OBJECTIVES.names
objective_class = OBJECTIVES.get
objective_problems = OBJECTIVES.problems
objective_spec = OBJECTIVES.spec


def build_objective(spec: dict[str, Any] | Objective | None, **kwargs: Any) -> Objective:
    """An objective from ``{"name": ..., **fields}`` (validated; raises ConfigError); None: causal LM."""
    import lmadapt.objectives  # noqa: F401  (registers the built-in objectives)

    return OBJECTIVES.build(OBJECTIVES.normalise(spec), **kwargs)

