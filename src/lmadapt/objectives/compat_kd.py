"""Compatibility-aware training: distil from the old task model where it was right, so an update breaks less.

Echterhoff et al., "MUSCLE: A Model Update Strategy for Compatible LLM Evolution" (arXiv:2407.09435). The
model being trained (the new base with an adapter, ``M_v2C``) learns the data and, per target token t, the
distribution of a teacher chosen by whether the old task model ``M_v1`` (old base + its adapter) predicts the
gold token:

    teacher_t = M_v1   if argmax p_v1(. | x_<t) = y_t
                M_v2   otherwise (the new task model, when one is given; without it the token gets CE only)
    loss = sum_t CE(y_t, p_student) + kd_weight * T^2 * sum_t KL(p_teacher_t^T || p_student^T)

with p^T = softmax(logits / T) (T^2 keeps the gradient scale independent of T, as in
:mod:`lmadapt.objectives.distill`, whose chunked KL this reuses). The loop divides by the step's target tokens.
The teachers may sit on other base versions than the student, but must share its tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import count_targets, target_positions
from lmadapt.objectives.distill import (
    _common_vocab,
    _DistillSums,
    _logits_at,
    load_teacher,
)


def choose_teacher(student: torch.Tensor, old: torch.Tensor, new: torch.Tensor | None,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher logits, rows taught by the old model, rows taught by the new one) for (N, V) logits and (N,)
    targets (-100: no target).

    A row takes the old model's logits where the old model's argmax is its target (MUSCLE's mask), else the new
    model's; without a new model it takes the student's own (detached) logits, so its KL and the KL's gradient
    are exactly zero and only the cross-entropy acts there. The teacher is written into ``old`` in place when it
    has the student's dtype (the caller's no-grad tensor), so no further (N, V) tensor is made.
    """
    valid = targets != -100
    use_old = (old.argmax(-1) == targets) & valid
    teacher = old.to(student.dtype)
    rest = ~use_old
    if new is not None:
        teacher[rest] = new[rest].to(student.dtype)
        use_new = rest & valid
    else:
        teacher[rest] = student.detach()[rest]
        use_new = torch.zeros_like(use_old)
    return teacher, use_old, use_new


def compat_kd_loss(old: nn.Module, new: nn.Module | None, *, kd_weight: float = 1.0, temperature: float = 1.0,
                   vocab_size: int | None = None,
                   chunk_size: int = 256) -> Callable[..., tuple[torch.Tensor, int, Any]]:
    """A loss function ``(model, batch, *, drop_padding_mask=True) -> (loss_sum, n, outputs)`` for MUSCLE's
    compatibility-aware training (see the module docstring). ``old``/``new`` are frozen task models run under
    no_grad at the student's target positions only; ``outputs.compat_sums`` holds the detached sums ``kl``,
    ``ce``, ``old_teacher_share`` and ``new_teacher_share`` (token counts; the loop logs them per target token).
    """
    if temperature <= 0 or kd_weight < 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0, kd_weight >= 0 and chunk_size >= 1; got temperature={temperature}, "
                         f"kd_weight={kd_weight}, chunk_size={chunk_size}")
    for teacher in (old, new):
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def loss_fn(model: nn.Module, batch: dict[str, Any], *,
                drop_padding_mask: bool = True) -> tuple[torch.Tensor, int, Any]:
        labels = batch["labels"]
        positions = target_positions(model, labels)
        if positions is None:
            positions = torch.arange(labels.shape[1] - 1, device=labels.device)
        outputs, logits = _logits_at(model, batch, positions, drop_padding_mask)
        with torch.no_grad():
            old_logits = _logits_at(old, batch, positions, drop_padding_mask)[1].flatten(0, 1)
            new_logits = None if new is None else _logits_at(new, batch, positions, drop_padding_mask)[1].flatten(0, 1)
        student = logits.flatten(0, 1)
        s, old_logits = _common_vocab(student, old_logits, vocab_size)
        if new_logits is not None:
            s, new_logits = _common_vocab(student, new_logits, vocab_size)
        targets = labels[:, positions + 1].to(s.device).reshape(-1)
        with torch.no_grad():
            teacher, use_old, use_new = choose_teacher(s, old_logits, new_logits, targets)
        kl, ce = _DistillSums.apply(s, teacher, targets, temperature, chunk_size)
        outputs.logit_positions = positions
        outputs.compat_sums = {"kl": kl.detach(), "ce": ce.detach(), "old_teacher_share": use_old.sum(),
                               "new_teacher_share": use_new.sum()}
        return ce + kd_weight * temperature ** 2 * kl, int((targets != -100).sum()), outputs
    return loss_fn


@dataclass
class CompatKDConfig:
    old_model: str | None = option(None, "The OLD task model's base: a built-in name or model folder (e.g. version "
                                         "1); null: the base old_adapter records. Needs the student's tokenizer.")
    old_adapter: str | None = option(None, "Adapter folder of the OLD task model, applied to old_model (null: "
                                           "old_model alone is the old task model).")
    new_model: str | None = option(None, "The NEW task model's base (e.g. version 2), teacher where the old model is "
                                         "wrong; null with new_adapter null: no new teacher, those tokens get CE only.")
    new_adapter: str | None = option(None, "Adapter folder of the NEW task model, applied to new_model (null: "
                                           "new_model alone; new_model null: the base the adapter records).")
    kd_weight: float = option(1.0, "lambda: weight of T^2 * KL(p_teacher || p_student) per target token (the CE "
                                   "has weight 1). UNCERTAIN: the paper gives no value that we could confirm.")
    temperature: float = option(1.0, "Softening temperature T of both distributions in the KL term (the mask "
                                     "uses the old model's plain argmax).")
    force: bool = option(False, "Apply old_adapter/new_adapter even to base weights other than those they were "
                                "trained on (e.g. a ported adapter on version 2).")
    chunk_size: int = option(256, "Positions whose vocabulary-wide KL/CE temporaries exist at once (memory bound).")

    def check(self) -> list[str]:
        problems = []
        if not (self.old_model or self.old_adapter):
            problems.append("old_model: give the old task model: old_model, old_adapter, or both")
        if self.temperature <= 0:
            problems.append(f"temperature: must be > 0, got {self.temperature}")
        if self.kd_weight < 0:
            problems.append(f"kd_weight: must be >= 0, got {self.kd_weight}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size: must be >= 1, got {self.chunk_size}")
        return problems


@register_objective
class CompatKD(Objective):
    """MUSCLE's loss: sum_t CE_t + kd_weight * T^2 * sum_t KL(p_teacher_t^T || p_student^T), the teacher the old
    task model where it predicts the gold token, else the new one (see :func:`compat_kd_loss`); normalised by
    the step's target tokens."""

    name = "compat_kd"
    config_class = CompatKDConfig

    def __init__(self, config: CompatKDConfig, old: nn.Module | None = None, new: nn.Module | None = None) -> None:
        super().__init__(config)
        self.old, self.new = old, new  # loaded task models; None: loaded from the config in setup()
        self._loss: Callable[..., tuple[torch.Tensor, int, Any]] | None = None

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        cfg = self.config
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")

        def task_model(base: str | None, adapter: str | None, side: str) -> nn.Module:
            what = f"objective.{side}_adapter" if adapter else f"objective.{side}_model"
            return load_teacher(base, tokenizer, dtype=dtype, device=device, what=what, adapter=adapter,
                                force=cfg.force)
        if self.old is None:
            self.old = task_model(cfg.old_model, cfg.old_adapter, "old")
        if self.new is None and (cfg.new_model or cfg.new_adapter):
            self.new = task_model(cfg.new_model, cfg.new_adapter, "new")
        self._loss = compat_kd_loss(self.old, self.new, kd_weight=cfg.kd_weight, temperature=cfg.temperature,
                                    vocab_size=len(tokenizer) if tokenizer else None, chunk_size=cfg.chunk_size)

    def count(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        if self._loss is None:
            raise RuntimeError("call CompatKD.setup(model, tokenizer, device) before loss()")
        loss, n, outputs = self._loss(model, batch, drop_padding_mask=drop_padding_mask)
        return LossOutput(loss, n, outputs, {k: float(v) for k, v in outputs.compat_sums.items()})
