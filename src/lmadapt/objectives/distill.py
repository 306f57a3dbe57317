"""Distillation: token-level KL to a frozen teacher's distribution, plus optional cross-entropy.

Hinton et al., "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531). The teacher is another
model with the same tokenizer (a larger one, or a helper model's teacher, :mod:`lmadapt.recipes.helper_model`),
or the model being trained with its adapters switched off (``teacher: base``: self-distillation, which keeps
an adapted model close to its base without a second copy in memory). The KL is forward (teacher || student) or
reverse; Mix-CPT's logit swap (arXiv:2407.10804) makes the teacher rank the gold token first; SALT
(arXiv:2410.18779) distils only during the first ``until_step`` steps, then trains with the plain loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import (
    causal_lm_loss,
    count_targets,
    forward_inputs,
    takes_logits_to_keep,
    target_positions,
)

BASE = "base"  # the teacher that is the trained model itself with its adapters switched off
DIRECTIONS = ("forward", "reverse")  # KL(teacher || student), KL(student || teacher)


class _DistillSums(torch.autograd.Function):
    """(sum_i KL_i, sum_i CE_i) over the rows whose target is not -100, chunked; KL forward or reverse.

    ``student`` and ``teacher`` are (N, V) logits, ``targets`` (N,) token ids or -100 (row ignored).
    Per row, with s = student / T, t = teacher / T, lse the log-sum-exp over the vocabulary,
    p_t = exp(t - lse(t)) and p_s = exp(s - lse(s)):
        forward KL(p_t || p_s) = sum_v p_t (t - s) - lse(t) + lse(s)
        reverse KL(p_s || p_t) = sum_v p_s f,         f = (s - lse(s)) - (t - lse(t)) = log p_s - log p_t
        CE = lse(student) - student[target]
    and the gradients, which the backward recomputes chunk by chunk from the saved logits:
        forward: dKL/dstudent = (p_s - p_t) / T,     reverse: dKL/dstudent = p_s (f - KL) / T
        dCE/dstudent = softmax(student) - onehot(target)
    Only per-row log-sum-exps (and, for reverse, the per-row KL) are kept between forward and backward, so
    at most ``chunk`` rows of fp32 (fp64 for fp64 input) vocabulary-wide temporaries exist at a time, and
    ignored rows are masked instead of copied out.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                temperature: float, chunk: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n, T = student.shape[0], temperature
        acc = torch.promote_types(student.dtype, torch.float32)
        lse_s, lse_t, lse_1 = (torch.empty(n, dtype=acc, device=student.device) for _ in range(3))
        kl_r = torch.empty(n if reverse else 0, dtype=acc, device=student.device)  # per-row KL: reverse only
        kl = torch.zeros((), dtype=acc, device=student.device)
        ce = torch.zeros((), dtype=acc, device=student.device)
        valid = targets != -100
        picked = targets.clamp_min(0)[:, None]
        for a in range(0, n, chunk):
            rows = slice(a, a + chunk)
            s1 = student[rows].to(acc)
            s, t = (s1, teacher[rows].to(acc)) if T == 1 else (s1 / T, teacher[rows].to(acc) / T)
            lse_s[rows], lse_t[rows] = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
            if reverse:
                log_ps = s - lse_s[rows, None]
                f = log_ps - (t - lse_t[rows, None])
                kl_rows = kl_r[rows] = log_ps.exp_().mul_(f).sum(-1)
            else:
                p_t = (t - lse_t[rows, None]).exp_()
                kl_rows = p_t.mul_(t - s).sum(-1) - lse_t[rows] + lse_s[rows]  # not t.sub_: t may be the teacher's
            lse_1[rows] = lse_s[rows] if T == 1 else torch.logsumexp(s1, -1)
            ce_rows = lse_1[rows] - s1.gather(1, picked[rows]).squeeze(1)
            kl += kl_rows[valid[rows]].sum()
            ce += ce_rows[valid[rows]].sum()
        ctx.save_for_backward(student, teacher, targets, lse_s, lse_t, lse_1, kl_r)
        ctx.temperature, ctx.chunk, ctx.reverse = T, chunk, reverse
        return kl, ce

    @staticmethod
    def backward(ctx: Any, g_kl: torch.Tensor, g_ce: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, teacher, targets, lse_s, lse_t, lse_1, kl_r = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        use_kl, use_ce = bool(g_kl != 0), bool(g_ce != 0)
        if not (use_kl or use_ce):
            return torch.zeros_like(student), None, None, None, None, None
        grad = torch.empty_like(student)
        valid = targets != -100
        masked = not bool(valid.all())
        for a in range(0, student.shape[0], chunk):
            rows = slice(a, a + chunk)
            s1 = student[rows].to(lse_s.dtype)
            g = None
            if use_kl:
                s, t = (s1, teacher[rows].to(s1.dtype)) if T == 1 else (s1 / T, teacher[rows].to(s1.dtype) / T)
                log_ps = s - lse_s[rows, None]
                if ctx.reverse:  # p_s * (log p_s - log p_t - KL)
                    f = (log_ps - (t - lse_t[rows, None])).sub_(kl_r[rows, None])
                    g = log_ps.exp_().mul_(f).mul_(g_kl / T)
                else:  # out of place: at T = 1, t may be the teacher's own rows
                    g = log_ps.exp_().sub_((t - lse_t[rows, None]).exp_()).mul_(g_kl / T)
            if use_ce:
                p_1 = (s1 - lse_1[rows, None]).exp_()
                p_1[torch.arange(p_1.shape[0], device=p_1.device), targets[rows].clamp_min(0)] -= 1
                g = p_1.mul_(g_ce) if g is None else g.add_(p_1.mul_(g_ce))
            if masked:
                g.mul_(valid[rows, None])
            grad[rows] = g
        return grad, None, None, None, None, None


def swap_gold_to_top_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mix-CPT's logit swap, in place on ``logits`` (N, V), which it returns: in each row whose target y is not
    -100 and not already the argmax m, the logits of y and m trade values, z[y] <-> z[m].

    Jiang et al., "Mix-CPT: A Domain Adaptation Framework via Decoupling Knowledge Learning and Format
    Alignment" (arXiv:2407.10804), logit swap self-distillation: softmax of the swapped logits puts its most
    mass on the gold token and keeps the rest of the teacher's distribution as it was. No (N, V) copy.
    """
    rows = (targets != -100).nonzero().squeeze(1)
    gold, top = targets[rows].to(logits.device), logits.argmax(-1)[rows]  # not logits[rows]: a copy
    z_gold, z_top = logits[rows, gold], logits[rows, top]
    logits[rows, gold], logits[rows, top] = z_top, z_gold  # rows where gold == top get their own value back
    return logits


def _logits_at(model: nn.Module, batch: dict[str, Any], positions: torch.Tensor,
               drop_padding_mask: bool) -> tuple[Any, torch.Tensor]:
    """(outputs, (B, P, V) logits at ``positions``), computed only there when the model allows it."""
    inputs = forward_inputs(batch, drop_padding_mask)
    if takes_logits_to_keep(type(model)):
        outputs = model(**inputs, use_cache=False, logits_to_keep=positions)
        return outputs, outputs.logits
    outputs = model(**inputs, use_cache=False)
    return outputs, outputs.logits[:, positions]


def _common_vocab(student: torch.Tensor, teacher: torch.Tensor,
                  vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit tensors cut to the shared vocabulary; a width difference is only allowed as padding."""
    ws, wt = student.shape[-1], teacher.shape[-1]
    if ws == wt and (vocab_size is None or vocab_size >= ws):
        return student, teacher
    if vocab_size is None or min(ws, wt) < vocab_size:
        raise ValueError(
            f"distillation needs one vocabulary: the student has {ws} logits per position and the teacher "
            f"{wt}{'' if vocab_size is None else f', but the tokenizer has {vocab_size} tokens'}. Use a "
            f"teacher with the student's tokenizer (pass vocab_size=len(tokenizer) when one of them only "
            f"pads its output layer).")
    return student[..., :vocab_size], teacher[..., :vocab_size]


def distillation_loss(teacher: nn.Module | str | None, *, temperature: float = 1.0, distill_weight: float = 1.0,
                      lm_weight: float = 0.0, vocab_size: int | None = None, chunk_size: int = 256,
                      direction: str = "forward",
                      logit_swap: bool = False) -> Callable[..., tuple[torch.Tensor, int, Any]]:
    """A loss function ``(model, batch, *, drop_padding_mask=True) -> (loss_sum, n, outputs)``: token-level
    knowledge distillation from a frozen ``teacher`` (a model, or ``"base"``: the trained model with its
    adapters switched off), plus CE.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531). Summed over
    the target tokens t (labels != -100), with p^T = softmax(logits / T):
        loss = distill_weight * T^2 * sum_t KL(p_teacher^T || p_student^T) + lm_weight * sum_t CE_t
    (T^2 keeps the gradient scale independent of T). ``direction="reverse"`` uses KL(p_student^T || p_teacher^T)
    instead (mode-seeking; MiniLLM, arXiv:2306.08543). ``logit_swap``: the teacher's logits of each target
    token and of its top token trade places first (:func:`swap_gold_to_top_`, Mix-CPT). The teacher runs in eval mode under no_grad at
    the same positions as the student, and both compute vocabulary logits only at positions that
    predict a target (``target_positions``; all but the last for raw text). Both must share a
    tokenizer: logits of different widths are refused, unless ``vocab_size`` (the tokenizer's length)
    shows the extra columns are padding, which is cut off. The KL and CE are computed ``chunk_size``
    positions at a time (see :class:`_DistillSums`); ``outputs.distill_sums`` holds their detached
    sums. Without a teacher, or with ``distill_weight=0``, this is ``lm_weight`` times
    :func:`causal_lm_loss`.
    """
    if temperature <= 0 or distill_weight < 0 or lm_weight < 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0, weights >= 0 and chunk_size >= 1; got temperature={temperature}, "
                         f"distill_weight={distill_weight}, lm_weight={lm_weight}, chunk_size={chunk_size}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if teacher is None or distill_weight == 0:
        if lm_weight == 0:
            raise ValueError("both loss weights are 0 (or there is no teacher and lm_weight is 0): nothing to train")

        def lm_only(model: nn.Module, batch: dict[str, Any], *,
                    drop_padding_mask: bool = True) -> tuple[torch.Tensor, int, Any]:
            loss, n, outputs = causal_lm_loss(model, batch, drop_padding_mask=drop_padding_mask)
            return (loss if lm_weight == 1 else lm_weight * loss), n, outputs
        return lm_only
    if isinstance(teacher, nn.Module):
        teacher.eval()
        teacher.requires_grad_(False)
    elif teacher != BASE:
        raise ValueError(f"teacher must be a model or {BASE!r}, got {teacher!r}")

    def loss_fn(model: nn.Module, batch: dict[str, Any], *,
                drop_padding_mask: bool = True) -> tuple[torch.Tensor, int, Any]:
        labels = batch["labels"]
        positions = target_positions(model, labels)
        if positions is None:  # ask for all but the last position: contiguous logits, no slicing copy
            positions = torch.arange(labels.shape[1] - 1, device=labels.device)
        outputs, logits = _logits_at(model, batch, positions, drop_padding_mask)
        with torch.no_grad():
            if isinstance(teacher, nn.Module):
                _, teacher_logits = _logits_at(teacher, batch, positions, drop_padding_mask)
            else:
                with adapters_disabled(model):
                    _, teacher_logits = _logits_at(model, batch, positions, drop_padding_mask)
        s, t = _common_vocab(logits.flatten(0, 1), teacher_logits.flatten(0, 1), vocab_size)
        targets = labels[:, positions + 1].to(s.device).reshape(-1)
        if logit_swap:
            t = swap_gold_to_top_(t, targets)  # the teacher's logits are this call's own (no_grad) tensor
        kl, ce = _DistillSums.apply(s, t, targets, temperature, chunk_size, direction == "reverse")
        outputs.logit_positions = positions
        outputs.distill_sums = {"kl": kl.detach(), "ce": ce.detach()}
        return distill_weight * temperature ** 2 * kl + lm_weight * ce, int((targets != -100).sum()), outputs
    return loss_fn


@dataclass
class DistillConfig:
    teacher: str = option(BASE, "base: the model being trained with its adapters switched off (self-distillation; "
                                "no second copy in memory; needs an adapter method such as lora). Otherwise a "
                                "built-in name or model folder with the same tokenizer, loaded frozen on the "
                                "training device in the student's dtype.")
    temperature: float = option(1.0, "Softening temperature T of both distributions in the KL term.")
    distill_weight: float = option(1.0, "Weight of T^2 * KL per target token.")
    lm_weight: float = option(0.0, "Weight of the next-token cross-entropy on the data per target token.")
    direction: Literal["forward", "reverse"] = option(
        "forward", "forward: KL(p_teacher || p_student) (mass-covering, Hinton et al.). reverse: "
                   "KL(p_student || p_teacher) (mode-seeking, as MiniLLM, arXiv:2306.08543).")
    logit_swap: bool = option(False, "Mix-CPT's logit swap (arXiv:2407.10804): the teacher's logit of each target "
                                     "token trades places with its top logit, so the target distribution ranks the "
                                     "gold token first. Meant with teacher: base (logit-swap self-distillation).")
    until_step: int | None = option(
        None, "SALT (arXiv:2410.18779): distil during the first until_step optimizer steps only, then train with "
              "the plain next-token cross-entropy (weight 1) and run no teacher. A step count, not a fraction of "
              "max_steps, so the switch stays put when a resumed run extends max_steps. null: distil throughout.")
    chunk_size: int = option(256, "Positions whose vocabulary-wide KL/CE temporaries exist at once (memory bound).")

    def check(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature: must be > 0, got {self.temperature}")
        if self.distill_weight < 0 or self.lm_weight < 0 or self.distill_weight + self.lm_weight == 0:
            problems.append("lm_weight: the weights must be >= 0 and not both 0")
        if self.chunk_size < 1:
            problems.append(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if self.until_step is not None and self.until_step < 1:
            problems.append(f"until_step: must be >= 1 (the steps that distil), got {self.until_step}; null "
                            f"distils throughout, and plain cross-entropy from the start is objective causal_lm")
        if not str(self.teacher).strip():
            problems.append(f"teacher: empty; give {BASE!r}, a built-in name or a model folder")
        return problems


@register_objective
class Distill(Objective):
    """loss = distill_weight * T^2 * sum_t KL + lm_weight * sum_t CE_t over the target tokens t, normalised by the
    step's target tokens (see :func:`distillation_loss`); KL(p_teacher^T || p_student^T), or reversed. With
    ``until_step`` N (SALT), optimizer steps N + 1 onwards (0-based index >= N) are the plain causal LM loss."""

    name = "distill"
    config_class = DistillConfig

    def __init__(self, config: DistillConfig, teacher: nn.Module | None = None) -> None:
        super().__init__(config)
        self.teacher = teacher  # a loaded model; None: load config.teacher in setup() (or use the base)
        self._loss: Callable[..., tuple[torch.Tensor, int, Any]] | None = None
        self._step = 0  # the 0-based index of the optimizer step being taken (begin_step)

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        cfg = self.config
        teacher: nn.Module | str = self.teacher if self.teacher is not None else cfg.teacher
        if teacher != BASE and isinstance(teacher, str):
            dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")
            teacher = self.teacher = load_teacher(teacher, tokenizer, dtype=dtype, device=device,
                                                  what="objective.teacher")
        self._loss = distillation_loss(teacher, temperature=cfg.temperature, distill_weight=cfg.distill_weight,
                                       lm_weight=cfg.lm_weight, vocab_size=len(tokenizer) if tokenizer else None,
                                       chunk_size=cfg.chunk_size, direction=cfg.direction,
                                       logit_swap=cfg.logit_swap)

    def begin_step(self, step: int, total: int) -> None:
        self._step = step

    @property
    def distilling(self) -> bool:
        """Whether the current step distils (False past ``until_step``: SALT's switch to the plain loss)."""
        return self.config.until_step is None or self._step < self.config.until_step

    def count(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        if not self.distilling:  # SALT's second phase: no teacher forward at all
            return LossOutput(*causal_lm_loss(model, batch, drop_padding_mask=drop_padding_mask))
        if self._loss is None:
            raise RuntimeError("call Distill.setup(model, tokenizer, device) before loss()")
        loss, n, outputs = self._loss(model, batch, drop_padding_mask=drop_padding_mask)
        sums = getattr(outputs, "distill_sums", {})
        return LossOutput(loss, n, outputs, {k: float(v) for k, v in sums.items()})


def load_teacher(name: str | None, tokenizer: Any, *, dtype: str, device: torch.device, what: str = "teacher",
                 hint: str = "", adapter: str | None = None, force: bool = False) -> nn.Module:
    """The frozen teacher ``name`` (eval mode, no gradients) on ``device`` in ``dtype``; refused unless it has the
    tokenizer of the model being trained and a logit for each of its tokens. ``what`` names the setting in
    messages; ``hint`` is appended to the advice. ``adapter``: an adapter folder applied to the teacher (``name``
    None: on the base it records; ``force``: even when trained on other base weights), as :func:`lmadapt.api.load`."""
    from lmadapt.api import load
    from lmadapt.models.vocab import vocabulary_mismatch

    try:
        teacher, teacher_tok, _ = load(name, adapter, dtype=dtype, device=str(device), force=force)
    except LmadaptError as exc:  # a missing folder, an adapter for other weights: say which setting named it
        raise LmadaptError(f"{what}: {exc}") from None
    name = name or f"the base of adapter {adapter}"
    if tokenizer is not None:
        mismatch = vocabulary_mismatch(tokenizer, teacher_tok)
        if mismatch:
            raise LmadaptError(
                f"{what}: {name!r} has a different tokenizer from the model being trained "
                f"({len(teacher_tok.get_vocab()):,} vs {len(tokenizer.get_vocab()):,} tokens; it differs {mismatch}). "
                f"Distillation compares next-token distributions over one vocabulary: use a teacher with the same "
                f"tokenizer{hint}.")
        width = teacher.get_output_embeddings().weight.shape[0]
        if width < len(tokenizer):
            raise LmadaptError(f"{what}: {name!r} has {width:,} output logits but the tokenizer has "
                               f"{len(tokenizer):,} tokens; it cannot be distilled over that vocabulary")
    return teacher.eval().requires_grad_(False)
