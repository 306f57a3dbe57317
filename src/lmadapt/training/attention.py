"""Attention for training on CPUs: three batched matmuls and a softmax, in the activations' dtype.

    O = softmax(Q K^T / sqrt(d) + M) V        M: 0 where a query may attend, the dtype's minimum elsewhere

On a CPU, torch's fused ("flash") attention kernel is slow in its backward pass in bf16: with SmolLM2
shapes (64-dim heads, 300-512 tokens) it reached about a tenth of an AMX machine's bf16 matmul rate and
took over a third of a LoRA step. Written as ``matmul -> softmax -> matmul``, each piece is a large bf16
GEMM or a vectorised softmax, and autograd's backward is GEMMs too; fwd+bwd was 1.5-1.8x faster at
those shapes (``benchmarks/train_throughput.py``). The price is memory: the probabilities P
(batch x heads x L x L) are kept for the backward pass of every layer.

In fp32 it is the other way round: the flash kernel's fp32 path is fast, and keeps only the output and
a log-sum-exp per row. On an AVX2 machine, fwd+bwd of one SmolLM2 layer (batch 8, causal) took 70 ms at
300 tokens and 170 ms at 490 with sdpa, against 118 and 471 ms as three matmuls, and the probabilities
of 30 layers held 2.4 GB. So only bf16/fp16 activations (:data:`MATMUL_DTYPES`) take the matmul path;
fp32 goes to sdpa.

Grouped-query attention needs no copy of K and V: the query heads that share a KV head are stacked
along the sequence axis, so one matmul serves the whole group.

It is registered with transformers as attention implementation ``"lmadapt_cpu"`` (its masks are the
sdpa ones) and used by the training loop on CPU only while a model trains (see :func:`training_attention`);
anything it does not cover (fp32, a KV cache, dropout, soft-capping, sliding windows, attention sinks,
a non-CPU device) goes to transformers' sdpa implementation unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

NAME = "lmadapt_cpu"
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")
MATMUL_DTYPES = (torch.bfloat16, torch.float16)  # activations' dtypes that take the matmul path


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (B, H, L, D) query, (B, Hkv, S, D) key/value, a boolean
    (B or 1, 1, L or 1, S) mask (True: attend) or None for plain causal (full attention when ``is_causal`` is
    False: a layer whose causal mask was removed, :mod:`lmadapt.models.unmask`); returns ((B, L, H, D), None)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if (query.device.type != "cpu" or query.dtype not in MATMUL_DTYPES or dropout or q_len != kv_len
            or heads % kv_heads
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    if attention_mask is None and is_causal is False:  # a bidirectional layer with no padding in the batch
        attention_mask = torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=query.device)
    return grouped_attention(query, key, value, attention_mask, dim ** -0.5 if scaling is None else scaling), None


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The matmul path itself, whatever the dtype: shapes as :func:`matmul_attention` (L == S, H a multiple
    of Hkv, a boolean mask or None for causal); returns (B, L, H, D)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = (query * scale).reshape(batch, kv_heads, group * q_len, dim)  # heads h = g * group + j share KV head g
    scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, kv_heads, group, q_len, kv_len)
    scores.add_(_mask_bias(attention_mask, q_len, query.dtype, query.device).unsqueeze(2))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * q_len, kv_len)
    out = torch.matmul(probs, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous()


def _mask_bias(mask: torch.Tensor | None, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (B or 1, 1, L, L) bias: 0 where attending, the dtype's minimum elsewhere (a row with
    nothing to attend to gets a uniform softmax instead of NaN, as transformers' eager attention does)."""
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    bias = torch.zeros(mask.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~mask, torch.finfo(dtype).min)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, matmul_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def training_attention(model: nn.Module, device: torch.device) -> Iterator[bool]:
    """Inside: a model that uses sdpa attention on a CPU uses :func:`matmul_attention` instead.

    Yields whether it switched. Models with another implementation (eager, flash, flex, a model's own)
    and other devices are left alone. The model's implementation is restored on exit, so generation,
    evaluation and saved configs are unaffected.
    """
    config = getattr(model, "config", None)
    if device.type != "cpu" or config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
