"""The method interface: what a way of adapting a model must say, and the registry that finds it by name.

A method is one file that defines a config dataclass and a :class:`Method` subclass decorated with
:func:`register`. The training loop knows nothing about any particular method; it calls these hooks
in this order (see ``docs/methods.md`` for how each planned method maps onto them)::

    method = build_method({"name": "lora", "r": 16})
    method.calibrate(model, batches)          # only if method.calibration_batches > 0 (PiSSA/CorDA inits)
    method.apply(model)                       # swap/add modules through lmadapt.models.tree, set requires_grad
    groups = method.parameter_groups(model)   # which parameters train, in which optimizer group
    for each step:
        loss = objective(model, batch) [+ method.extra_loss(ctx)]    # ctx.base_logits() = adapters off
        method.before_optimizer_step(ctx); optimizer.step(); method.after_optimizer_step(ctx)
        if method.on_step_end(ctx): rebuild the optimizer from method.parameter_groups(model)
    method.adapter_state(model) -> tensors saved in adapter_model.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Parameters that share optimizer settings. ``lr_scale`` multiplies the run's learning rate."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the run's weight decay


@dataclass
class StepContext:
    """What a method hook may look at during one optimizer step."""

    model: nn.Module
    batch: dict[str, torch.Tensor]
    step: int  # optimizer steps completed before this one
    max_steps: int
    outputs: Any = None  # the objective's model output: .logits at .logit_positions (None: all positions)
    optimizer: torch.optim.Optimizer | None = None
    _base_logits: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def base_logits(self) -> torch.Tensor:
        """Logits of the frozen base model on this batch, at the same positions as ``outputs.logits``:
        the same model with its adapters switched off.

        Computed once per step and only when a hook asks for it (BA-LoRA, self-distillation).
        """
        if "base_logits" not in self._cache:
            if self._base_logits is None:
                raise RuntimeError("base logits are not available outside the training step")
            self._cache["base_logits"] = self._base_logits()
        return self._cache["base_logits"]


class Method:
    """Base of all methods. Subclasses set ``name`` and ``config_class`` and override the hooks they need.

    Only :meth:`apply`, :meth:`parameter_groups`, :meth:`adapter_state` and :meth:`load_adapter_state`
    are required; every other hook has a neutral default, so a method states only what it changes.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    peft_type: ClassVar[str | None] = None  # set when the saved adapter is loadable by PEFT
    mergeable: ClassVar[bool] = False  # merge()/unmerge() are exact
    identity_at_init: ClassVar[bool] = True  # apply() leaves the model's outputs unchanged
    trains_base_weights: ClassVar[bool] = False  # True: the optimizer updates base weights (kept in fp32)

    def __init__(self, config: Any) -> None:
        self.config = config

    # --- set-up ---------------------------------------------------------------------------------
    @property
    def calibration_batches(self) -> int:
        """How many training batches :meth:`calibrate` wants before :meth:`apply` (0: none)."""
        return int(getattr(self.config, "calibration_batches", 0) or 0)

    def calibrate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """See data before the adapter exists (activation statistics for SVD-based inits)."""

    def apply(self, model: nn.Module) -> None:
        """Swap or add modules (only through ``lmadapt.models.tree``) and set ``requires_grad``."""
        raise NotImplementedError(f"method {self.name!r} must implement apply()")

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The trainable parameters, each in exactly one group."""
        raise NotImplementedError(f"method {self.name!r} must implement parameter_groups()")

    # --- training hooks ---------------------------------------------------------------------------
    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """A term added to the objective's loss (regularisers, distillation from ``ctx.base_logits()``)."""
        return None

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Runs after gradients are final (accumulated, clipped) and before ``optimizer.step()``."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Runs right after ``optimizer.step()`` (e.g. rescale the step per row, project weights)."""

    def on_step_end(self, ctx: StepContext) -> bool:
        """Periodic structural change (prune/regrow, gradual freezing, next stage).

        Return True when the set of trainable parameters changed: the loop then rebuilds the
        optimizer from :meth:`parameter_groups` (keeping state for parameters that remain).
        """
        return False

    # --- merging ----------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights in place (outputs unchanged)."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`."""
        raise NotImplementedError(f"method {self.name!r} cannot be unmerged")

    def unload(self, model: nn.Module) -> None:
        """Remove the adapter modules, leaving a plain transformers model (call after merge to keep it)."""

    # --- saving -----------------------------------------------------------------------------------
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed as they appear in ``adapter_model.safetensors``."""
        raise NotImplementedError(f"method {self.name!r} must implement adapter_state()")

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state` into a model that :meth:`apply` has prepared."""
        raise NotImplementedError(f"method {self.name!r} must implement load_adapter_state()")

    def adapter_config(self) -> dict[str, Any]:
        """Fields for ``adapter_config.json`` besides lmadapt's own (PEFT's fields, when PEFT has the method)."""
        return {}

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any]) -> dict[str, Any]:
        """Translate a PEFT ``adapter_config.json`` into this method's config dict."""
        raise NotImplementedError(f"method {cls.name!r} does not read PEFT adapters")
