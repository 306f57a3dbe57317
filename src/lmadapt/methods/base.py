"""The method interface: what a way of adapting a model must say, and the registry that finds it by name.

A method is one file that defines a config dataclass and a :class:`Method` subclass decorated with
:func:`register`. The training loop knows nothing about any particular method; it calls these hooks
in this order (see ``docs/methods.md`` for how each planned method maps onto them)::

    method = build_method({"name": "lora", "r": 16})
    tokenizer = method.prepare(model, tokenizer)  # may change the vocabulary (then the adapter carries the tokenizer)
    method.calibrate(model, batches)          # only if method.calibration_batches > 0 (PiSSA/CorDA inits)
    method.apply(model)                       # swap/add modules through lmadapt.models.tree, set requires_grad
    groups = method.parameter_groups(model)   # which parameters train, in which optimizer group
    for each step (step = optimizer steps done before it):
        for each micro-batch i: loss_i = objective.loss(model, mb_i) [+ method.extra_loss(ctx_i)]
                                # ctx_i.batch/.outputs/.micro_index; ctx_i.base_logits() = adapters off
        step_ctx.micro_batches = [ctx_0, ..., ctx_n]       # every micro-batch's batch, in order
        method.metrics() -> logged with the step as <method name>/<key>
        method.before_optimizer_step(step_ctx); optimizer.step(); method.after_optimizer_step(step_ctx)
        if method.on_step_end(step_ctx): rebuild the optimizer from method.parameter_groups(model)
    method.adapter_state(model) -> tensors saved in adapter_model.safetensors
    method.state_dict() -> JSON-able state saved in checkpoints; load_state_dict() on resume, first

tests/test_method_contract.py drives a probe method through a real Trainer and checks this order.
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
    micro_index: int = 0  # which micro-batch of the step this is (extra_loss); the last one for step-level hooks
    # Step-level hooks (before/after_optimizer_step, on_step_end): every micro-batch's context of the step, in
    # order, with its batch (outputs are released after extra_loss to bound memory). Empty in extra_loss.
    micro_batches: list[StepContext] = field(default_factory=list)
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
    causal_attention: ClassVar[bool] = True  # False: the method lets positions attend to later ones
    changes_tokenizer: ClassVar[bool] = False  # True: prepare() changes the tokenizer; adapters then carry it
    # True: several adapters of this method may share one model under names (``adapter_name``/``trainable``
    # attributes; lmadapt.adapters.pool switches and routes them). Only such adapters load under a name.
    named_adapters: ClassVar[bool] = False
    # True: apply() rewrites base weights (PiSSA-style residuals) but the adapter modules can still give the
    # base model's outputs (adapters_disabled) and merge back to a plain model; False: base weights untouched.
    rewrites_base_weights: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    # --- set-up ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, tokenizer: Any) -> Any:
        """Before anything else (calibration, :meth:`apply`): see, and possibly change, the tokenizer and the
        vocabulary (add tokens, resize the embeddings). Returns the tokenizer to use from now on. A method that
        changes it sets ``changes_tokenizer``, and its adapter folders then carry the tokenizer's files.

        Loading an adapter calls it again, on the base model, with the tokenizer the folder carries (already
        changed): it must then only bring the model to that tokenizer (e.g. resize the embeddings to
        ``len(tokenizer)``) without changing the tokenizer again. The new rows' values come from the adapter's
        tensors, so :meth:`adapter_state` must hold them. A method that does not change the tokenizer may get
        None there (an adapter loaded with ``load_adapter(model, path)`` and no tokenizer)."""
        return tokenizer

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

    def metrics(self) -> dict[str, float]:
        """Numbers to log for the step whose micro-batches just ran (a regulariser's value, a gate's mean), read once
        per step and logged as ``<method name>/<key>``; the method resets what it gathered. The default: none."""
        return {}

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

    # --- state across a resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Non-tensor state (a stage, a schedule position, indices as lists) that checkpoints save as JSON.

        Tensors belong in :meth:`adapter_state`. The default: nothing."""
        return {}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume, before the adapter tensors are loaded and the optimizer is
        rebuilt from :meth:`parameter_groups`: a method whose trainable set depends on its state (it returned
        True from :meth:`on_step_end`) re-establishes that set here."""

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

    def export(self, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]] | None:
        """The portable form of the trained adapter, written as a run's final ``adapter/`` in place of this
        method's own (checkpoints always keep the own form, which resumes exactly): a method and the tensors
        in its format, e.g. a PiSSA adapter as a plain LoRA of the *unmodified* base that PEFT and vLLM load.
        None (the default): the own form is the portable one."""
        return None

    @classmethod
    def claims_peft(cls, peft_config: dict[str, Any]) -> bool:
        """Whether this method reads the PEFT adapter configured by ``peft_config`` (its ``adapter_config.json``).
        The default: its ``peft_type`` matches. Methods sharing a PEFT type (LoRA and DoRA: "LORA") tell their
        files apart here; a method whose files only lmadapt's record identifies returns False."""
        return peft_config.get("peft_type") == cls.peft_type

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any]) -> dict[str, Any]:
        """Translate a PEFT ``adapter_config.json`` into this method's config dict."""
        raise NotImplementedError(f"method {cls.name!r} does not read PEFT adapters")
