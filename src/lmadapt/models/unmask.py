"""Causal-mask removal in chosen decoder layers: those layers attend bidirectionally, padding stays masked.

LS-unLLaMA (Li et al., "Label Supervised LLaMA Finetuning", arXiv:2310.01208) removes the causal mask in every
layer; "Do Not (Always) Look Right" (Dukić & Šnajder, arXiv:2401.14556) removes it only in chosen layers. Per
layer the attention mask is either

    locked:   M[b, q, k] = causal(q, k) and real[b, k]      (the model's own mask)
    unlocked: M[b, q, k] = real[b, k]                          (every query sees every real key)

How: a forward pre-hook on each unlocked layer's ``self_attn`` replaces the mask the model built for it
(``masking_utils.create_causal_mask``, in whatever form the attention implementation takes: a boolean or
additive 4-D tensor, flash attention's 2-D padding mask) with its *last query row*. Under a causal mask the
last query sees every key up to the end, so that row is exactly the padding-only mask; as a (B, 1, 1, S) tensor
it broadcasts over the queries. It also passes ``is_causal=False``, so sdpa, flash attention and lmadapt's CPU
attention do not apply causality themselves when the model built no mask at all (no padding). No transformers
code is patched, the hooks live on the modules (so gradient checkpointing's recomputation sees them too), and
the model's state-dict keys do not change. A forward with a KV cache (one new query per step) is left alone:
generation with a bidirectional layer is not defined.

Packed batches (several examples per row, separated by position restarts) are not supported: their
block-diagonal mask is not a padding mask, and the last row would be wrong; :func:`check_unmaskable` is for
callers that know the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmadapt.errors import LmadaptError
from lmadapt.models.tree import transformer_blocks

UnmaskSpec = Literal["none", "all"] | list[int]
_HANDLES = "_lmadapt_unmask_handles"  # attribute of the model holding {layer index: hook handle}


def resolve_layers(spec: UnmaskSpec, last: int, num_layers: int) -> list[int]:
    """The sorted indices of the layers to unmask: ``"none"``, ``"all"``, or a list of indices (negative ones count
    from the end, as in Python), plus the ``last`` k layers. Raises ValueError for an index out of range."""
    chosen: set[int] = set()
    if spec == "all":
        chosen = set(range(num_layers))
    elif isinstance(spec, (list, tuple)):
        for i in spec:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"unmask_layers: layer {i} does not exist; the model has {num_layers} layers "
                                 f"(0 to {num_layers - 1}, or -1 to -{num_layers} from the end)")
            chosen.add(i % num_layers)
    elif spec != "none":
        raise ValueError(f"unmask_layers: expected 'none', 'all' or a list of layer indices, got {spec!r}")
    if last > num_layers:
        raise ValueError(f"unmask_last: {last} layers asked, the model has {num_layers}")
    chosen |= set(range(num_layers - last, num_layers)) if last > 0 else set()
    return sorted(chosen)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    blocks = transformer_blocks(model)
    attn = [getattr(model.get_submodule(name), "self_attn", None) for name in blocks]
    if not blocks or any(a is None for a in attn):
        raise LmadaptError(f"cannot remove the causal mask in {type(model).__name__}: it needs decoder layers "
                           f"(model.layers.<i>) with a self_attn module, as Llama, Qwen, Mistral and Gemma have")
    return attn


def num_layers(model: nn.Module) -> int:
    """How many decoder layers ``model`` has (those :func:`unmask_layers` can choose from)."""
    return len(transformer_blocks(model))


def _padding_only(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an unlocked ``self_attn``: its mask becomes the padding-only (last-row) mask."""
    if kwargs.get("past_key_values") is not None and _cached(kwargs["past_key_values"]):
        return None
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    if mask is not None and not torch.is_tensor(mask):
        raise LmadaptError(f"causal-mask removal needs a tensor attention mask, got {type(mask).__name__} (flex "
                           f"attention's BlockMask?); load the model with attn_implementation sdpa or eager")
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, -1:, :]  # (B, 1, 1, S): the last query row = the padding mask, for every query
    kwargs = {**kwargs, "attention_mask": mask, "is_causal": False}
    if len(args) > 2:
        args = args[:2] + args[3:]  # now given by keyword
    return args, kwargs


def _cached(cache: Any) -> bool:
    """Whether a KV cache already holds tokens (a decoding step, not a fresh forward)."""
    seen = getattr(cache, "get_seq_length", None)
    return bool(seen()) if callable(seen) else True


def unmask_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Make ``layers`` (indices into the decoder layers) attend bidirectionally, padding still masked; the other
    layers keep the model's causal mask. Replaces what an earlier call chose; returns the unmasked indices."""
    attn = _attention_modules(model)
    remove_unmasking(model)
    handles: dict[int, RemovableHandle] = {}
    for i in sorted(set(layers)):
        if not 0 <= i < len(attn):
            raise ValueError(f"layer {i} does not exist; the model has {len(attn)} decoder layers")
        handles[i] = attn[i].register_forward_pre_hook(_padding_only, with_kwargs=True)
    model.__dict__[_HANDLES] = handles  # not a submodule, not in the state dict
    return sorted(handles)


def unmasked_layers(model: nn.Module) -> list[int]:
    """The indices of the layers :func:`unmask_layers` made bidirectional (empty: all causal)."""
    return sorted(model.__dict__.get(_HANDLES, {}))


def remove_unmasking(model: nn.Module) -> None:
    """Every layer causal again."""
    for handle in model.__dict__.pop(_HANDLES, {}).values():
        handle.remove()


def check_unmaskable(batch: dict[str, Any]) -> None:
    """Refuse a packed batch (no ``attention_mask``, positions restarting inside a row) for unmasked layers."""
    positions = batch.get("position_ids")
    if batch.get("attention_mask") is None and positions is not None and positions.shape[1] > 1 \
            and bool((positions[:, 1:] < positions[:, :-1]).any()):
        raise LmadaptError("causal-mask removal does not support packed rows (several examples in one row): set "
                           "data.batching to length_grouped or padded")
