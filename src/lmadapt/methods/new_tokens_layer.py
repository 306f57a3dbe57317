"""The layers of the ``new_tokens`` method: an embedding and an output layer whose rows for a span of token ids come
from trainable parameters of their own, so that only those rows train.

Vocabulary expansion (Yamaguchi et al., arXiv:2406.11477). With ``E`` the (resized) input embedding, ``W`` the
output layer and ``R`` a trainable ``(hi - lo) x d`` matrix for the ids ``lo <= i < hi``::

    e(i)      = R[i - lo]          if lo <= i < hi,   else E[i]
    logits_i  = h . R[i - lo] + b_i  if lo <= i < hi,   else h . W_i + b_i

(one ``R`` per matrix; a tied output layer reads the embedding's ``R``). The base ``weight`` stays the model's own
Parameter under its own name, so state-dict keys do not change. Merge writes ``R`` into ``weight[lo:hi]`` (keeping
the rows it overwrote, as PEFT's TrainableTokens does), unmerge writes them back. With ``adapter_enabled`` False
the layer gives the base weight's rows. Gemma-style scaled embeddings (an ``embed_scale``) keep their scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Span = tuple[str, int, int]  # (parameter name, lo, hi)


class _TokenRows(nn.Module):
    """What both layers share: the spans, their parameters (or a tied owner's), merge state and the switch."""

    casts_own_parameters = True  # the rows are fp32 and cast to the activations' dtype per call

    def __init__(self, base: nn.Module, spans: list[Span], owner: _TokenRows | None) -> None:
        super().__init__()
        self.weight = base.weight  # the same Parameter: the base model's key stays
        self.spans = list(spans)
        self._base = [base]  # not a submodule: unload() hands it back with its weight
        self._owner = [owner] if owner is not None else []
        self.adapter_enabled = True
        self._merged = False
        self._originals: list[torch.Tensor] = []
        if owner is None:
            for name, lo, hi in self.spans:
                values = base.weight.detach()[lo:hi].float().clone()
                setattr(self, name, nn.Parameter(values, requires_grad=True))

    @property
    def owner(self) -> _TokenRows:
        """The layer whose parameters and merge state this one uses (itself, or the tied embedding)."""
        return self._owner[0] if self._owner else self

    def row_parameters(self) -> list[tuple[int, int, nn.Parameter]]:
        """(lo, hi, R) per span, R this layer's own or the tied embedding's."""
        owner = self.owner
        return [(lo, hi, getattr(owner, name)) for name, lo, hi in owner.spans]

    @property
    def merged(self) -> bool:
        return self.owner._merged

    def replacements(self) -> list[tuple[int, int, torch.Tensor]]:
        """The rows this call puts in place of the weight's: R when enabled and unmerged, the rows merge overwrote
        when disabled and merged, else none (the weight already holds what is wanted)."""
        if self.adapter_enabled and not self.merged:
            return self.row_parameters()
        if not self.adapter_enabled and self.merged:
            return [(lo, hi, rows) for (lo, hi, _), rows in zip(self.row_parameters(), self.owner._originals)]
        return []

    @torch.no_grad()
    def merge(self) -> None:
        """Write R into ``weight[lo:hi]`` (once; a tied layer leaves it to its owner)."""
        if self._owner or self._merged:
            return
        self._originals = [self.weight[lo:hi].clone() for lo, hi, _ in self.row_parameters()]
        for lo, hi, rows in self.row_parameters():
            self.weight[lo:hi] = rows.to(self.weight.dtype)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write back the rows :meth:`merge` overwrote."""
        if self._owner or not self._merged:
            return
        for (lo, hi, _), rows in zip(self.row_parameters(), self._originals):
            self.weight[lo:hi] = rows
        self._originals, self._merged = [], False

    def unloaded(self) -> nn.Module:
        """The layer this one wraps, holding the weight as it is now (merged rows stay in it)."""
        base = self._base[0]
        base.weight = self.weight
        return base


class TokenRowsEmbedding(_TokenRows):
    """An input embedding whose rows ``lo..hi-1`` come from their own parameter (module docstring)."""

    def __init__(self, base: nn.Embedding, spans: list[Span]) -> None:
        super().__init__(base, spans, None)
        for key in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, key, getattr(base, key, None))
        self.norm_type = self.norm_type or 2.0
        self.scale_grad_by_freq, self.sparse = bool(self.scale_grad_by_freq), bool(self.sparse)
        scale = getattr(base, "embed_scale", None)  # Gemma's sqrt(d), a buffer or a float
        if isinstance(scale, torch.Tensor):
            self.register_buffer("embed_scale", scale, persistent=False)
        else:
            self.embed_scale = scale

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        for lo, hi, rows in self.replacements():
            inside = ((input_ids >= lo) & (input_ids < hi)).unsqueeze(-1)
            picked = F.embedding((input_ids - lo).clamp(0, hi - lo - 1), rows.to(out.dtype))
            out = torch.where(inside, picked, out)
        if self.embed_scale is not None:
            out = out * (self.embed_scale.to(out.dtype) if isinstance(self.embed_scale, torch.Tensor)
                         else self.embed_scale)
        return out

    def unloaded(self) -> nn.Module:
        base = super().unloaded()
        if isinstance(self.embed_scale, torch.Tensor):
            base.embed_scale = self.embed_scale  # moved with the model while wrapped
        return base


class TokenRowsHead(_TokenRows):
    """An output layer whose logits for ids ``lo..hi-1`` come from their own rows (module docstring); tied to
    ``owner`` (the embedding) it reads that layer's rows."""

    def __init__(self, base: nn.Linear, spans: list[Span], owner: TokenRowsEmbedding | None = None) -> None:
        super().__init__(base, spans if owner is None else owner.spans, owner)
        self.bias = base.bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()  # a strided slice makes a frozen linear ~100x slower (models.tree)
        out = F.linear(hidden, self.weight, self.bias)
        for lo, hi, rows in self.replacements():
            bias = self.bias[lo:hi] if self.bias is not None else None
            out[..., lo:hi] = F.linear(hidden, rows.to(hidden.dtype), bias)
        return out

    def unloaded(self) -> nn.Module:
        base = super().unloaded()
        base.bias = self.bias
        return base

