"""Continuation scoring: log-probabilities of candidate continuations after one context.

Shared by evaluation (multiple choice, classification) and steering (proxy scores), so the context runs once
and each continuation reuses its cache where the model allows it.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.decoding.generation import eval_mode
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import model_device

Strategy = Literal["auto", "cached", "batched"]


def right_pad(rows: list[list[int]], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def score_continuations(model: nn.Module, context: list[int], continuations: list[list[int]], *,
                        strategy: Strategy = "auto") -> list[torch.Tensor]:
    """Per-token log-probabilities ``log p(c_t | context, c_<t)`` of each continuation (float64, CPU).

    ``cached`` runs the context once, repeats its KV cache ``len(continuations)`` times and runs all
    continuations in one batch; ``batched`` runs context + continuation for all of them in one batch.
    ``auto`` picks ``cached`` (the faster on CPU when the context is longer than the continuations).
    """
    if strategy not in ("auto", "cached", "batched"):
        raise LmadaptError(f"score_continuations: strategy must be 'auto', 'cached' or 'batched', got {strategy!r}")
    if not context:
        raise LmadaptError("score_continuations: the context is empty; a first token needs something to follow")
    if any(not c for c in continuations):
        raise LmadaptError("score_continuations: a continuation tokenizes to no tokens")
    with eval_mode(model):
        if strategy == "batched":
            return _score_batched(model, context, continuations)
        return _score_cached(model, context, continuations)


def _forward(model: nn.Module, keep: int, **inputs: Any) -> Any:
    """Model outputs, computing the logits of only the last ``keep`` positions when the model allows it."""
    if "logits_to_keep" in _forward_parameters(model):
        inputs["logits_to_keep"] = keep
    return model(**inputs)


def _forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def continuation_logits(model: nn.Module, context: list[int], continuations: list[list[int]]) -> torch.Tensor | None:
    """(continuations, longest, vocab) logits at every continuation position (position t predicts token t).

    The context runs once; the continuations (all but their last token, which predicts nothing scored) run
    as one right-padded batch from its KV cache repeated per continuation. Positions past a continuation's
    end are padding. None when the model's cache cannot be repeated (then score context + continuation
    rows instead). The model is called as it is: wrap it in eval mode or ``adapters_disabled`` outside.
    """
    device, n, p = model_device(model), len(continuations), len(context)
    out = _forward(model, 1, input_ids=torch.tensor([context], device=device), use_cache=True)
    first = out.logits[:, -1:].expand(n, -1, -1)  # predicts each continuation's first token
    rest = [c[:-1] for c in continuations]
    width = max(len(r) for r in rest)
    cache = out.past_key_values
    if width == 0:  # single-token continuations: the context forward was all we needed
        return first
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(n)
    ids, mask = right_pad([r or [0] for r in rest], device)  # a one-token continuation gets a dummy row
    mask = torch.cat([torch.ones((n, p), dtype=torch.long, device=device), mask], dim=1)
    positions = torch.arange(p, p + width, device=device).expand(n, -1)
    later = _forward(model, width, input_ids=ids, attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True).logits
    return torch.cat([first, later], dim=1)


def _score_cached(model: nn.Module, context: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    logits = continuation_logits(model, context, continuations)
    if logits is None:
        return _score_batched(model, context, continuations)
    scores = []
    for i, c in enumerate(continuations):
        logp = logits[i, :len(c)].double().log_softmax(-1).cpu()
        scores.append(logp.gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1))
    return scores


def _score_batched(model: nn.Module, context: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    device, p = model_device(model), len(context)
    width = max(len(c) for c in continuations)
    ids, mask = right_pad([context + c for c in continuations], device)
    # Only positions p-1 .. p+width-2 predict continuation tokens: keep the logits of the last width+1.
    logits = _forward(model, width + 1, input_ids=ids, attention_mask=mask, use_cache=False).logits
    offset = ids.shape[1] - logits.shape[1]  # 0 when the model returned every position
    scores = []
    for i, c in enumerate(continuations):
        rows = logits[i, p - 1 - offset:p - 1 - offset + len(c)].double().log_softmax(-1).cpu()
        scores.append(rows.gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1))
    return scores
