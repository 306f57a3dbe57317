"""Preference training on (prompt, chosen, rejected) pairs: DPO, and the reference-free SimPO.

DPO: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(arXiv:2305.18290), with TRL's ``DPOTrainer`` (``loss_type="sigmoid"``) as the reference definition. For a pair
(x, y_w, y_l), log-probabilities summed over the response tokens only,

    Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
    L = −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)

ε the label smoothing (conservative DPO: each label is wrong with probability ε). π_ref is the model being trained
with its adapters switched off (no second copy in memory), under no_grad; or a frozen model ``reference``.

SimPO: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward" (arXiv:2405.14734),
as TRL's ``CPOTrainer`` (``loss_type="simpo"``) computes it, label smoothing included:

    z = β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ
    L = −(1 − ε)·log σ(z) − ε·log σ(−z)

|y| the number of response tokens. The data (``data.format: preference``) gives every micro-batch its pairs'
chosen sequences first, then their rejected ones in the same order, and ``batch["pairs"]``: their number. The
log-softmax behind log π is taken ``chunk_size`` positions at a time with an exact gradient (:func:`token_logps`),
so no fp32 copy of the (2P, T, V) logits is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.data.tokens import IGNORE
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import (
    forward_inputs,
    takes_logits_to_keep,
    target_positions,
)
from lmadapt.objectives.distill import load_teacher

DEFAULT_BETA = {"sigmoid": 0.1, "simpo": 2.0}
DEFAULT_GAMMA = 0.5


class _TokenLogps(torch.autograd.Function):
    """(N,) log p(target) = logits[target] − logsumexp(logits) per row of (N, V) ``logits``; 0 where the target is
    -100. The log-sum-exps are computed ``chunk`` rows at a time in fp32 (fp64 for fp64 logits) and only they are
    kept for the backward, which recomputes each chunk's softmax from the saved logits:

        d out_i / d logits_i = onehot(target_i) − softmax(logits_i)      (0 for an ignored row)

    So no fp32 (N, V) tensor exists at any time, only ``chunk`` rows of one (``_DistillSums`` in
    :mod:`lmadapt.objectives.distill` does the same for summed KL and CE; DPO needs each row's value, weighted per
    sequence by the loss, so it is its own function).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for a in range(0, logits.shape[0], chunk):
            lse[a:a + chunk] = torch.logsumexp(logits[a:a + chunk].to(acc), -1)
        valid = targets != IGNORE
        picked = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return torch.where(valid, picked - lse, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        g = torch.where(targets != IGNORE, grad_out.to(lse.dtype), 0.0)  # (N,): the weight of each row
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], ctx.chunk):
            rows = slice(a, a + ctx.chunk)
            d = (logits[rows].to(lse.dtype) - lse[rows, None]).exp_().mul_(-g[rows, None])  # −g·softmax
            d[torch.arange(d.shape[0], device=d.device), targets[rows].clamp_min(0)] += g[rows]  # +g·onehot
            grad[rows] = d
        return grad, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log_softmax(logits)[..., target] for (..., V) ``logits`` and (...) ``targets`` (0 where -100), computed ``chunk``
    positions at a time with an exact gradient (:class:`_TokenLogps`); the result is fp32 (fp64 for fp64 logits)."""
    flat = _TokenLogps.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk)
    return flat.view(targets.shape)


def response_logps(model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False,
                   chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """((B,) sum of log p(label) over each row's target tokens, (B,) how many there are, the model's output).

    Logits are computed only at positions that predict a target in some row (``target_positions``), and the
    log-softmax ``chunk_size`` positions at a time (:func:`token_logps`): sum_t [logit_t(y_t) − logsumexp_v
    logit_t(v)] over the t with labels[t + 1] != -100.
    """
    labels = batch["labels"]
    positions = target_positions(model, labels)
    if positions is None and takes_logits_to_keep(type(model)):  # all but the last: contiguous, no slicing copy
        positions = torch.arange(labels.shape[1] - 1, device=labels.device)
    inputs = forward_inputs(batch, drop_padding_mask)
    if positions is None:
        outputs = model(**inputs, use_cache=False)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    else:
        outputs = model(**inputs, use_cache=False, logits_to_keep=positions)
        logits, targets = outputs.logits, labels[:, positions + 1]
    outputs.logit_positions = positions
    targets = targets.to(logits.device)
    return token_logps(logits, targets, chunk_size).sum(-1), (targets != IGNORE).sum(-1), outputs


def _smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1 − ε)·log σ(z) − ε·log σ(−z), elementwise."""
    loss = -F.logsigmoid(z)
    return loss if label_smoothing == 0 else (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               *, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (DPO loss, reward of the chosen β(log π − log π_ref), reward of the rejected); see the module
    docstring. The inputs are (P,) summed response log-probabilities."""
    reward_chosen = beta * (chosen - ref_chosen)
    reward_rejected = beta * (rejected - ref_rejected)
    return _smoothed(reward_chosen - reward_rejected, label_smoothing), reward_chosen, reward_rejected


def simpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
                 *, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (SimPO loss, reward of the chosen β/|y|·log π(y|x), reward of the rejected); see the module
    docstring. ``n_*``: (P,) response token counts."""
    reward_chosen = beta * chosen / n_chosen.clamp_min(1)
    reward_rejected = beta * rejected / n_rejected.clamp_min(1)
    return _smoothed(reward_chosen - reward_rejected - gamma, label_smoothing), reward_chosen, reward_rejected


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "simpo"] = option(
        "sigmoid", "sigmoid: DPO against a reference model (arXiv:2305.18290). simpo: SimPO, reference-free, the "
                   "rewards length-normalised, with a target margin gamma (arXiv:2405.14734).")
    beta: float | None = option(
        None, "beta, the scale of the implicit reward. null: 0.1 for sigmoid (the DPO paper's and TRL's default), "
              "2.0 for simpo (torchtune's SimPOLoss default; the SimPO paper used 2.0-2.5).")
    gamma: float | None = option(
        None, "simpo only: the target reward margin gamma. null: 0.5 (torchtune's SimPOLoss default; the SimPO "
              "authors suggest gamma = c * beta with c about 0.25-0.4).")
    label_smoothing: float = option(
        0.0, "epsilon in [0, 0.5): the assumed chance that a pair's label is wrong (conservative DPO): "
             "loss = -(1 - epsilon) log sigmoid(z) - epsilon log sigmoid(-z).")
    reference: str | None = option(
        None, "sigmoid only: the reference model. null: the model being trained with its adapters switched off (no "
              "second copy in memory; needs an adapter method such as lora). Otherwise a built-in name or model "
              "folder with the same tokenizer, loaded frozen in the trained model's dtype (needed with method full).")
    chunk_size: int = option(256, "Positions whose vocabulary-wide log-softmax temporaries exist at once (memory "
                                  "bound); the result and its gradient do not depend on it.")

    def check(self) -> list[str]:
        problems = []
        if self.beta is not None and self.beta <= 0:
            problems.append(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.gamma is not None and self.loss != "simpo":
            problems.append(f"gamma: the target margin of loss simpo; loss is {self.loss!r}. Remove gamma, or set "
                            f"loss: simpo")
        if self.gamma is not None and self.gamma < 0:
            problems.append(f"gamma: must be >= 0, got {self.gamma}")
        if self.reference is not None and self.loss == "simpo":
            problems.append("reference: loss simpo uses no reference model. Remove reference, or set loss: sigmoid")
        if self.chunk_size < 1:
            problems.append(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if self.reference is not None and not str(self.reference).strip():
            problems.append("reference: empty; give null (the model with its adapters off), a built-in name or a "
                            "model folder")
        return problems


@register_objective
class DPO(Objective):
    """DPO (``loss: sigmoid``) or SimPO (``loss: simpo``) on preference pairs, summed per pair and normalised by
    the step's pairs (see the module docstring). Logs, per pair: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin`` (their difference) and ``rewards/accuracy`` (the share with a positive margin); validation
    reports the held-out pairs' loss, reward accuracy and margin (a pair loss has no perplexity)."""

    name = "dpo"
    config_class = DPOConfig
    data_format = "preference"
    validation_metrics = ("rewards/accuracy", "rewards/margin")

    def __init__(self, config: DPOConfig, reference: nn.Module | None = None) -> None:
        super().__init__(config)
        self.reference = reference  # a loaded frozen model; None: config.reference, else the adapters-off model
        self.beta = config.beta if config.beta is not None else DEFAULT_BETA[config.loss]
        self.gamma = config.gamma if config.gamma is not None else DEFAULT_GAMMA

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        cfg = self.config
        if cfg.loss == "simpo" or self.reference is not None:
            return
        if cfg.reference is not None:
            dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")
            self.reference = load_teacher(cfg.reference, tokenizer, dtype=dtype, device=device,
                                          what="objective.reference", hint=" (the reference scores the same tokens)")
            return
        try:
            with adapters_disabled(model):
                pass
        except LmadaptError as exc:
            raise LmadaptError(
                f"objective.reference: null means the model being trained with its adapters switched off, but {exc}. "
                f"Give objective.reference (e.g. the base model's folder or built-in name: it is loaded frozen), "
                f"use an adapter method such as lora, or set objective.loss: simpo (no reference).") from None

    def count(self, batch: dict[str, Any]) -> int:
        if "pairs" not in batch:
            raise LmadaptError("objective dpo trains on preference pairs, but the batch holds plain sequences: give "
                               "rows with prompt, chosen and rejected (data.format: preference, or auto)")
        return int(batch["pairs"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        n, cfg = self.count(batch), self.config
        logps, lengths, outputs = response_logps(model, batch, drop_padding_mask=drop_padding_mask,
                                                 chunk_size=cfg.chunk_size)
        if cfg.loss == "simpo":
            losses, chosen, rejected = simpo_losses(logps[:n], logps[n:], lengths[:n], lengths[n:], beta=self.beta,
                                                    gamma=self.gamma, label_smoothing=cfg.label_smoothing)
        else:
            ref = self._reference_logps(model, batch, drop_padding_mask)
            losses, chosen, rejected = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta=self.beta,
                                                  label_smoothing=cfg.label_smoothing)
        chosen, rejected = chosen.detach(), rejected.detach()
        margin = chosen - rejected
        metrics = {"rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum()),
                   "rewards/margin": float(margin.sum()), "rewards/accuracy": float((margin > 0).sum())}
        return LossOutput(losses.sum(), n, outputs, metrics)

    @torch.no_grad()
    def _reference_logps(self, model: nn.Module, batch: dict[str, Any], drop_padding_mask: bool) -> torch.Tensor:
        """(B,) summed response log-probabilities under π_ref: the frozen reference, else ``model`` with its
        adapters off."""
        chunk = self.config.chunk_size
        if self.reference is not None:
            return response_logps(self.reference, batch, drop_padding_mask=drop_padding_mask, chunk_size=chunk)[0]
        with adapters_disabled(model):
            return response_logps(model, batch, drop_padding_mask=drop_padding_mask, chunk_size=chunk)[0]
