"""The KV cache of a batch whose rows come and go: left-aligned, one attention-mask column per cache column.

Row r of a batch of width L holds its tokens in the last ``lengths[r]`` columns; the columns before are padding,
zeros in the cache and 0 in the ``(B, L)`` attention mask. Each decode step feeds every row's pending token at
position ``lengths[r]`` (its own count of real tokens, so RoPE sees the positions the row would have alone),
with the mask ``[mask, 1]``; the model appends one column to every layer. Rows that join are prefilled apart
(:func:`prefill`) and their cache rows appended (:meth:`BatchCache.extend`: the narrower of the two is padded on
the left to the wider's width); rows that leave are dropped (:meth:`BatchCache.keep`), and columns that became
padding in every row are cut off the left (:meth:`BatchCache.trim`).

Supported caches: a transformers ``DynamicCache`` of full-attention layers (``DynamicLayer``: keys
``(B, heads, L, head_dim)``) and sliding-window layers (``DynamicSlidingWindowLayer``: the last
``min(L, window - 1)`` columns, ``cumulative_length == L``), which covers Llama/SmolLM2, Qwen2/3, Mistral and
Gemma 2/3 in transformers 5. Other layers (linear attention, static, quantized) are refused with a
:class:`~lmadapt.errors.ModelError`. The transformers mask builders read a layer's length from
``get_mask_sizes``, which for both layer kinds follows ``cumulative_length``/``keys``, kept equal to L here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmadapt.decoding.generation import left_pad
from lmadapt.errors import ModelError

try:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
except ImportError:  # a transformers without per-layer cache objects: check_cache refuses every model
    DynamicLayer = DynamicSlidingWindowLayer = type("Unavailable", (), {})

SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


@functools.cache
def _forward_parameters(cls: type[nn.Module]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` from transformers 5.24, else ``past_key_values``."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def check_cache(cache: Any, columns: int) -> None:
    """Raise a ModelError unless ``cache`` is a cache the batch can edit, holding ``columns`` columns (one per
    token fed: a method that puts extra positions in the cache, such as prompt tuning's soft prompt, has more)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelError(f"the model returned a {type(cache).__name__} KV cache; the serving engine needs a "
                         f"transformers DynamicCache made of per-layer objects (cache.layers), as transformers 5 has")
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) not in SUPPORTED_LAYERS})
    if odd:
        raise ModelError(f"the model's KV cache has {', '.join(odd)} layers; the serving engine can edit only "
                         f"full-attention and sliding-window layers (DynamicLayer, DynamicSlidingWindowLayer)")
    held = cache.get_seq_length()
    if held != columns:
        raise ModelError(f"the model's KV cache holds {held} positions after {columns} tokens; the serving engine "
                         f"needs one cache position per token (a method that adds virtual tokens to the cache, "
                         f"such as prompt tuning, cannot share a batch)")


def model_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  cache: Any) -> tuple[torch.Tensor, Any]:
    """(fp32 logits of each row's last position (B, vocab), the cache) of one forward with the KV cache."""
    extra: dict[str, Any] = {}
    if "logits_to_keep" in _forward_parameters(type(model)):
        # an index tensor gathers a contiguous copy (an int slices a strided view; see decoding/steering.py)
        extra["logits_to_keep"] = torch.tensor([ids.shape[1] - 1], device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_keyword(model): cache}, **extra)
    returned = out.get("cache", out.get("past_key_values"))
    return out.logits[:, -1, :].float(), returned


def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int,
            device: torch.device) -> tuple[torch.Tensor, BatchCache]:
    """Run ``prompts`` (left-padded into one batch) through ``model``: (next-token logits (B, vocab), their cache)."""
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    logits, cache = model_forward(model, ids, mask, positions, None)
    check_cache(cache, ids.shape[1])
    return logits, BatchCache(cache, mask, mask.sum(-1))


@dataclass
class BatchCache:
    """A batch's KV cache, its ``(B, L)`` attention mask and each row's count of real tokens."""

    cache: Any = None  # a DynamicCache, None while the batch is empty
    mask: torch.Tensor | None = None  # (B, L) long: 1 at a row's real columns
    lengths: torch.Tensor | None = None  # (B,) long: real tokens per row; also the position of its next token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask (B, L + 1), position ids (B, 1)) for feeding one token per row."""
        return torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1), self.lengths[:, None]

    def stepped(self, cache: Any) -> None:
        """Record the forward that :meth:`step_inputs` fed: one more real column in every row."""
        self.cache = cache
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        self.lengths = self.lengths + 1

    def extend(self, other: BatchCache) -> None:
        """Append ``other``'s rows (after this batch's): both are padded on the left to the wider width."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.lengths = other.cache, other.mask, other.lengths
            return
        width = max(self.width, other.width)
        mine, theirs = self.cache.layers, other.cache.layers
        for a, b in zip(mine, theirs):
            if not (a.is_initialized and b.is_initialized):  # a layer that reuses another's cache
                continue
            ka, va = _widened(a, self.width, width)
            kb, vb = _widened(b, other.width, width)
            a.keys, a.values = torch.cat([ka, kb]), torch.cat([va, vb])
            if isinstance(a, DynamicSlidingWindowLayer):
                a.cumulative_length = width
        self.mask = torch.cat([_pad_columns(self.mask, width - self.width),
                               _pad_columns(other.mask, width - other.width)])
        self.lengths = torch.cat([self.lengths, other.lengths])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the batch, in the new order), then :meth:`trim`."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache = self.mask = self.lengths = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        self.trim()

    def trim(self) -> None:
        """Cut the columns on the left that are padding in every row."""
        real = self.mask.any(0).nonzero()
        cut = int(real[0]) if len(real) else self.width
        if cut == 0:
            return
        width = self.width - cut
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width
                held = min(width, layer.sliding_window - 1)
                layer.keys, layer.values = layer.keys[..., -held:, :], layer.values[..., -held:, :]
            else:
                layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
        self.mask = self.mask[:, cut:]


def _pad_columns(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` zero columns in front: of dim 1 for a (B, L) mask, of dim -2 for (B, heads, L, d) keys."""
    if n == 0:
        return t
    if t.dim() == 2:
        return torch.cat([t.new_zeros(t.shape[0], n), t], dim=1)
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def _widened(layer: Any, width: int, new_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (keys, values) for a batch ``width`` columns wide, padded on the left for ``new_width``."""
    if isinstance(layer, DynamicSlidingWindowLayer):  # holds the last min(width, window - 1) columns
        pad = min(new_width, layer.sliding_window - 1) - layer.keys.shape[-2]
    else:
        pad = new_width - width
    return _pad_columns(layer.keys, pad), _pad_columns(layer.values, pad)
