"""The sparse-delta arithmetic behind SpIEL (:mod:`lmadapt.methods.spiel`): a linear layer over
W0 + scatter(indices, values) whose backward forms the dense gradient only transiently, and the drop/grow choices
of a reselection (which entries leave, which enter), as pure functions of tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def with_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor W0 + scatter(indices, values) in ``dtype`` (W0 itself is left alone)."""
    w = weight.to(dtype, copy=True)
    w.view(-1).index_add_(0, indices, values.to(dtype))
    return w


class SparseDeltaLinear(torch.autograd.Function):
    """``layer``: the adapted module; while its ``collect`` is set, its ``observe`` gets each dense dL/dW.

    y = x (W0 + scatter(indices, values))^T + b. Saves x and the (shared) W0, values and indices only; the
    backward rebuilds W for dL/dx and forms the dense dL/dW = g^T x transiently for dL/dvalues = dL/dW[indices]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                indices: torch.Tensor, layer: Any) -> torch.Tensor:
        ctx.save_for_backward(x, weight, values, indices)
        ctx.observe = layer.observe if layer.collect else None
        w = with_delta(weight, indices, values, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ with_delta(weight, indices, values, grad.dtype)
        if ctx.needs_input_grad[3]:
            dense = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # d_out x d_in, this call only
            if ctx.observe is not None:
                ctx.observe(dense)
            grad_values = dense.view(-1).index_select(0, indices).to(values.dtype)
        return grad_x, None, None, grad_values, None, None


def drop_positions(values: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the ``n`` entries with the smallest |value|, smallest first."""
    return torch.topk(values.detach().abs(), n, largest=False, sorted=True).indices


def ag_swap(indices: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor,
            n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to overwrite, which candidates go there): drop the n smallest |value|, grow the best-scoring
    candidates not staying active; an entry both dropped and regrown stays. Equal counts (fewer when candidates
    run short: then the largest of the dropped stay)."""
    idx, cand = indices.long(), candidates.long()
    out_pos = drop_positions(values, n)
    outgoing = idx[out_pos]
    valid = (~torch.isin(cand, idx) | torch.isin(cand, outgoing)).nonzero().squeeze(1)
    best = valid[torch.topk(scores[valid], min(n, valid.numel()), sorted=True).indices]
    out_pos = out_pos[~torch.isin(outgoing, cand[best])]
    best = best[~torch.isin(cand[best], outgoing)]
    return out_pos[: best.numel()], best


def ma_swap(indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
            n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to overwrite, new flat indices): drop the n smallest |value|, grow the n inactive indices with
    the largest row[r] col[c] (the score matrix exists only inside this call)."""
    score = torch.outer(rows, cols).view(-1)
    score[indices.long()] = -math.inf
    n = min(n, score.numel() - indices.numel())
    return drop_positions(values, n), torch.topk(score, n, sorted=True).indices
