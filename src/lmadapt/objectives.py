"""Training objectives: what the loop minimises. Only the causal-LM objective exists so far; SFT and
continual pretraining both use it (the data decides which tokens carry loss through ``labels``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that the model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, Any]:
    """Summed next-token cross-entropy over the tokens whose label is not -100.

    Returns (loss_sum, n_target_tokens, model_outputs). The loop divides by the tokens of the whole
    accumulated step, so every target token weighs the same however the step was split.
        loss = - sum_t log p(x_{t+1} | x_{<=t}) over target positions t
    """
    outputs = model(**model_inputs(batch), use_cache=False)
    logits = outputs.logits[:, :-1, :]
    labels = batch["labels"][:, 1:].to(logits.device)
    n_tokens = int((labels != -100).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, n_tokens, outputs
