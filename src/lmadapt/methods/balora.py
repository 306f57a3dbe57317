"""BA-LoRA: PiSSA plus three output-space regularisers against "catastrophic inheritance" (NLG losses).

"BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language Models",
arXiv:2408.04556; losses, weights and schedules as in the official NLG code (github.com/llm172/BA-LoRA,
``train.py``). The adapter is PiSSA's (start, residual, saved forms, export: :mod:`lmadapt.methods.pissa`); the
training loss becomes::

    L = L_task + lambda1(t) L_CR + lambda2(t) L_DR + lambda3(t) L_SVD

over the response tokens (those whose next-token label is not -100), with z_ft the trained model's logits,
z_pre the frozen pretrained model's (the adapters switched off: for PiSSA layers that is the original W0)::

    L_CR  = T^2 mean_t KL(softmax(z_pre / T) || softmax(z_ft / T))            consistency (knowledge drift)
    L_DR  = - mean_t H(softmax(topK(z_ft)))       (K = 0: the full vocabulary)   diversity (collapse)
    L_SVD = - sum_{i<=k} sigma_i(Z) / ||Z||_F     (or / sum_i sigma_i)           SVD (noise overfitting)

where Z (N x |V|) stacks the response-token logits. lambda1 decays by a cosine to ``consistency_min_ratio``
of itself over training; lambda2 and lambda3 are 0 for ``warmup_ratio`` of the steps, then ramp linearly over
``ramp_ratio`` of them to their full value. Only the NLG losses are implemented (the paper's NLU variants are not).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmadapt.config import option
from lmadapt.data.tokens import IGNORE
from lmadapt.methods.base import StepContext
from lmadapt.methods.pissa import Pissa, PissaConfig
from lmadapt.methods.registry import register

RANDOMIZED_SVD_ABOVE = 4096  # vocabulary width above which the top-k singular values come from svd_lowrank
NORM_FLOOR = 1e-8  # below it Z is (numerically) zero and L_SVD is skipped, as in the official code


@dataclass
class BaLoraConfig(PissaConfig):
    lambda_consistency: float = option(0.025, "lambda1: weight of the consistency term L_CR (KL to the frozen "
                                              "pretrained model on response tokens); 0: off, no extra forward.")
    lambda_diversity: float = option(0.005, "lambda2: weight of the diversity term L_DR (minus the entropy of the "
                                            "top-K next-token distribution); 0: off.")
    lambda_svd: float = option(0.005, "lambda3: weight of the SVD term L_SVD (minus the share of the top svd_k "
                                      "singular values of the response-token logit matrix); 0: off.")
    temperature: float = option(2.0, "T of the consistency term: both distributions are softened by T and the KL "
                                     "is multiplied by T^2.")
    top_k_entropy: int = option(20, "K of the diversity term: the entropy of the distribution renormalised over "
                                    "the K largest logits; 0: over the full vocabulary.")
    svd_k: int = option(10, "How many leading singular values the SVD term rewards (clipped to the matrix size).")
    svd_norm: Literal["frobenius", "sum"] = option(
        "frobenius", "Denominator of the SVD term: frobenius: ||Z||_F (the official script); sum: the sum of "
                     "all singular values (needs a full SVD of Z, also on large vocabularies).")
    consistency_schedule: Literal["cosine", "constant"] = option(
        "cosine", "lambda1 over training: cosine: decays from lambda_consistency to consistency_min_ratio times "
                  "it by the last step; constant: lambda_consistency throughout.")
    consistency_min_ratio: float = option(0.1, "Final lambda1 as a fraction of lambda_consistency (cosine).")
    warmup_ratio: float = option(0.2, "Fraction of the training steps during which lambda2 and lambda3 are 0 (the "
                                      "regularisers' own warm-up, not the learning rate's).")
    ramp_ratio: float = option(0.05, "Fraction of the steps over which lambda2 and lambda3 then rise linearly "
                                     "to full (at least one step).")

    def check(self) -> list[str]:
        problems = super().check()
        rules = [
            ("lambda_consistency", self.lambda_consistency >= 0, ">= 0"),
            ("lambda_diversity", self.lambda_diversity >= 0, ">= 0"),
            ("lambda_svd", self.lambda_svd >= 0, ">= 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k_entropy", self.top_k_entropy >= 0, ">= 0 (0: the full vocabulary)"),
            ("svd_k", self.svd_k >= 1, ">= 1"),
            ("consistency_min_ratio", 0 <= self.consistency_min_ratio <= 1, "in [0, 1]"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("ramp_ratio", 0 <= self.ramp_ratio <= 1, "in [0, 1]"),
        ]
        problems += [f"{k}: must be {want}, got {getattr(self, k)}" for k, ok, want in rules if not ok]
        return problems


# --- schedules --------------------------------------------------------------------------------------
def consistency_weight(base: float, step: int, max_steps: int, schedule: str = "cosine",
                       min_ratio: float = 0.1) -> float:
    """lambda1 at ``step`` (optimizer steps done): cosine from ``base`` (step 0) to ``min_ratio * base`` (step
    ``max_steps``), ``lam = lam_min + (base - lam_min) (1 + cos(pi t / T)) / 2``; or ``base`` (constant)."""
    if schedule == "constant":
        return base
    progress = min(step / max(max_steps, 1), 1.0)
    final = min_ratio * base
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def focus_weight(base: float, step: int, max_steps: int, warmup_ratio: float = 0.2,
                 ramp_ratio: float = 0.05) -> float:
    """lambda2 / lambda3 at ``step`` under the official "two_phase" schedule: 0 for the first
    ``int(warmup_ratio T)`` steps, then ``base (t - warmup) / ramp`` over ``ramp = max(int(ramp_ratio T), 1)``
    steps, then ``base``."""
    warmup = int(warmup_ratio * max_steps)
    ramp = max(int(ramp_ratio * max_steps), 1)
    if step < warmup:
        return 0.0
    if step < warmup + ramp:
        return base * (step - warmup) / ramp
    return base


def regularizer_weights(cfg: BaLoraConfig, step: int, max_steps: int) -> tuple[float, float, float]:
    """(lambda1, lambda2, lambda3) at ``step`` of ``max_steps``."""
    lam1 = consistency_weight(cfg.lambda_consistency, step, max_steps, cfg.consistency_schedule,
                              cfg.consistency_min_ratio)
    lam2 = focus_weight(cfg.lambda_diversity, step, max_steps, cfg.warmup_ratio, cfg.ramp_ratio)
    lam3 = focus_weight(cfg.lambda_svd, step, max_steps, cfg.warmup_ratio, cfg.ramp_ratio)
    return lam1, lam2, lam3


# --- the three losses (fp32, rows = response tokens) ------------------------------------------------
def response_logits(logits: torch.Tensor, labels: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """(N, |V|): the rows of ``logits`` that predict a label token, i.e. position t with ``labels[t + 1] != -100``.

    ``logits`` are an objective's output logits at ``positions`` (``outputs.logit_positions``; None: every
    position, of which the last predicts nothing), or at every position of the sequence.
    """
    length = labels.shape[1]
    if positions is None:
        targets = labels[:, 1:]
        logits = logits[:, : length - 1]
    else:
        targets = labels[:, positions + 1]
        if logits.shape[1] != positions.numel():  # every position's logits, beside the positions that count
            logits = logits[:, positions]
    return logits[targets.to(logits.device) != IGNORE]


def consistency_loss(z_ft: torch.Tensor, z_pre: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """L_CR = T^2 mean_t KL(p_pre || p_ft), p = softmax(z / T), over (N, |V|) rows; z_pre carries no gradient."""
    log_ft = F.log_softmax(z_ft.float() / temperature, dim=-1)
    log_pre = F.log_softmax(z_pre.detach().float() / temperature, dim=-1)
    if z_ft.shape[0] == 0:
        return log_ft.sum()  # no response token: 0, still part of the graph
    kl = (log_pre.exp() * (log_pre - log_ft)).sum(-1)
    return temperature ** 2 * kl.mean()


def diversity_loss(z: torch.Tensor, top_k: int = 20) -> torch.Tensor:
    """L_DR = - mean_t H(softmax(topK(z_t))), renormalised over the K largest logits (K = 0: all of them)."""
    z = z.float()
    if 0 < top_k < z.shape[-1]:
        z = z.topk(top_k, dim=-1).values
    log_q = F.log_softmax(z, dim=-1)
    if z.shape[0] == 0:
        return log_q.sum()
    return (log_q.exp() * log_q).sum(-1).mean()


def svd_loss(z: torch.Tensor, k: int = 10, norm: str = "frobenius", seed: int = 0) -> torch.Tensor:
    """L_SVD = - sum_{i<=k} sigma_i(Z) / ||Z||_F (``norm="sum"``: / sum_i sigma_i) for Z = ``z`` (N x |V|), fp32.

    k is clipped to min(N, |V|). With ``norm="frobenius"`` and |V| > 4096 the top-k singular values come from
    ``torch.svd_lowrank(Z, q=k+5, niter=2)`` (the official code's shortcut), its random start seeded by
    ``seed`` without touching the global RNG; otherwise from the exact ``svdvals``. 0 when the norm < 1e-8.
    """
    z = z.float()
    zero = z.sum() * 0.0
    k = min(k, *z.shape)
    if k == 0:
        return zero
    if norm == "frobenius":
        denom = torch.linalg.matrix_norm(z)
        if float(denom.detach()) < NORM_FLOOR:
            return zero
        if z.shape[1] > RANDOMIZED_SVD_ABOVE and k < min(z.shape):
            devices = [z.device] if z.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                _, sigma, _ = torch.svd_lowrank(z, q=min(k + 5, *z.shape), niter=2)
        else:
            sigma = torch.linalg.svdvals(z)
    elif norm == "sum":
        sigma = torch.linalg.svdvals(z)
        denom = sigma.sum()
        if float(denom.detach()) < NORM_FLOOR:
            return zero
    else:
        raise ValueError(f"norm must be 'frobenius' or 'sum', got {norm!r}")
    return -sigma[:k].sum() / denom


@register
class BaLora(Pissa):
    """BA-LoRA (arXiv:2408.04556): PiSSA + lambda1 L_CR + lambda2 L_DR + lambda3 L_SVD on the response tokens."""

    name = "balora"
    config_class = BaLoraConfig

    def __init__(self, config: BaLoraConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self._warned_no_logits = False

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """lambda1 L_CR + lambda2 L_DR + lambda3 L_SVD, each a mean over the micro-batch's response tokens (the
        units of the objective's loss); a term whose weight is 0 now is not computed."""
        cfg = self.config
        lam1, lam2, lam3 = regularizer_weights(cfg, ctx.step, ctx.max_steps)
        if lam1 == lam2 == lam3 == 0:
            return None
        logits = getattr(ctx.outputs, "logits", None)
        if logits is None:
            self._skip_without_logits(ctx)
            return None
        labels, positions = ctx.batch["labels"], getattr(ctx.outputs, "logit_positions", None)
        z_ft = response_logits(logits, labels, positions)
        with torch.autocast(device_type=logits.device.type, enabled=False):  # the terms in fp32, as the task loss
            terms = []
            if lam1 > 0:
                z_pre = response_logits(ctx.base_logits(), labels, positions)
                terms.append(lam1 * consistency_loss(z_ft, z_pre, cfg.temperature))
            if lam2 > 0:
                terms.append(lam2 * diversity_loss(z_ft, cfg.top_k_entropy))
            if lam3 > 0:
                terms.append(lam3 * svd_loss(z_ft, cfg.svd_k, cfg.svd_norm, seed=ctx.step))
            return sum(terms[1:], terms[0])

    def _skip_without_logits(self, ctx: StepContext) -> None:
        """The regularisers are defined on next-token distributions; an objective whose model gives none (the VAS
        value objective: a value head, no vocabulary logits) trains plain PiSSA, with one warning."""
        if not self._warned_no_logits:
            self._warned_no_logits = True
            warnings.warn(f"balora: the objective's outputs ({type(ctx.outputs).__name__}) carry no vocabulary "
                          f"logits, so the consistency, diversity and SVD terms are skipped and this trains as "
                          f"plain pissa. Use the causal_lm or distill objective for BA-LoRA's regularisers.",
                          stacklevel=3)
