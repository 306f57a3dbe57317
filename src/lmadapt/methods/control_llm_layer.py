"""Control LLM's expanded block: a frozen decoder block and a trainable copy of it, their outputs interpolated.

"Control LLM: Controlled Evolution for Intelligence Retention in LLM", Haichao Wei et al., arXiv:2501.10979; code
github.com/linkedin/ControlLLM (``utils/model_expander.py``, ``MergeLayerLerp`` / ``MergeLayerDlerp``). For one
block, with h_pre the frozen block's output and h_exp the copy's on the same input::

    lerp:   h = (1 - w) h_pre + w h_exp        w = sigmoid(f)                       (f a scalar)
    dlerp:  h = (1 - w) h_pre + w h_exp        w = sigmoid(W_d [h_pre ; h_exp] + b)  (per token; W_d: 1 x 2d)

and the divergence between the two branches, per token t (fp32)::

    mse:     d_t = mean_j (h_exp[t, j] - h_pre[t, j])^2
    cosine:  d_t = smooth_l1(relu(1 - margin - cos(h_pre[t], h_exp[t])))      (smooth L1 against 0, beta 1)

The copy starts as an exact copy, so h_exp == h_pre, h == h_pre and d == 0 bit for bit at init. ``1 - cos`` is
computed as ``||a/|a| - b/|b|||^2 / 2`` (the same quantity without the cancellation near cos = 1), which is exactly
0 for equal vectors.

The block keeps the frozen block's children under their own names (``self_attn``, ``mlp``, ...), so the base
model's state-dict keys do not change; the copy sits under ``control_expanded``. The frozen block runs through its
own forward (held outside the module tree). Its KV cache is a layer of its own appended to the model's ``Cache``
(index ``cache_slot``: the number of blocks + the expanded block's rank), so the copy's cache is the one at the
block's own index, and beam reordering, cropping and copying of the cache carry both.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.errors import LmadaptError

NOT_EXACT = ("a Control LLM block interpolates the outputs of two different non-linear blocks, which no single block "
             "computes, so it can be merged only where the interpolation picks one of them for every token: w = 1 "
             "(the copy replaces the original), w = 0, or a copy still equal to the original")


def expanded_indices(num_blocks: int, count: int) -> list[int]:
    """The blocks to expand: ``i_k = floor((k + 1) L / n) - 1`` for k < n, i.e. the blocks i with
    ``(i + 1) % (L / n) == 0`` when n divides L (ControlLLM's every 4th of 32 for n = 8), evenly spread otherwise,
    always ending with the last block."""
    if not 1 <= count <= num_blocks:
        raise ValueError(f"count must be in 1..{num_blocks}, got {count}")
    return [(k + 1) * num_blocks // count - 1 for k in range(count)]


def lerp(h_pre: torch.Tensor, h_exp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1 - w) h_pre + w h_exp in fp32 (``torch.lerp``: exactly h_pre when h_exp == h_pre), in h_pre's dtype."""
    return torch.lerp(h_pre.float(), h_exp.float(), w.float()).to(h_pre.dtype)


def mse_divergence(h_pre: torch.Tensor, h_exp: torch.Tensor) -> torch.Tensor:
    """Per token (..., d) -> (...): mean over the hidden size of (h_exp - h_pre)^2, fp32."""
    return (h_exp.float() - h_pre.float()).square().mean(-1)


def cosine_divergence(h_pre: torch.Tensor, h_exp: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per token (..., d) -> (...): smooth_l1(relu(1 - margin - cos(h_pre, h_exp))) against 0 (beta 1), fp32."""
    a = F.normalize(h_pre.float(), dim=-1, eps=1e-8)
    b = F.normalize(h_exp.float(), dim=-1, eps=1e-8)
    one_minus_cos = 0.5 * (a - b).square().sum(-1)
    gap = F.relu(one_minus_cos - margin)
    return F.smooth_l1_loss(gap, torch.zeros_like(gap), reduction="none", beta=1.0)


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class ControlBlock(nn.Module):
    """A decoder block whose output is lerp/dlerp(frozen block, trainable copy); see the module docstring.

    ``merge_method`` "lerp": a scalar ``control_factor`` f; "dlerp": ``control_gate`` = Linear(2d, 1), W_d zeros
    (``dlerp_weight_init`` "zeros") or torch's Linear init drawn from ``generator`` ("kaiming", as ControlLLM), its
    bias f. The gate parameters are fp32 and computed in fp32; the copy is kept in fp32 (the optimizer's master
    weights) and runs under autocast to the activations' dtype when the model computes in half precision.
    """

    casts_own_parameters = True  # the gate casts itself; the copy's own modules are checked on their own

    def __init__(self, block: nn.Module, index: int, cache_slot: int, merge_method: str, gate_init: float, *,
                 dlerp_weight_init: str = "zeros", generator: torch.Generator | None = None,
                 divergence: str = "none", cosine_margin: float = 0.0) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)  # the base keys stay: <block>.self_attn.q_proj.weight, ...
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, value in vars(block).items():  # plain attributes the model loop may read (attention_type, ...)
            if not name.startswith("_") and name not in ("training", "gradient_checkpointing") \
                    and isinstance(value, (bool, int, float, str)):
                setattr(self, name, value)
        self.__dict__["frozen_block"] = block  # outside the module tree: its children are registered above
        self.control_index, self.control_slot, self.merge_method = index, cache_slot, merge_method
        expanded = copy.deepcopy(block)
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in expanded.parameters()):
            expanded.float()
        self.control_expanded = expanded
        device = next(block.parameters()).device
        self.control_factor: nn.Parameter | None = None
        self.control_gate: nn.Linear | None = None
        if merge_method == "lerp":
            self.control_factor = nn.Parameter(torch.full((1,), float(gate_init), device=device))
        else:
            hidden = getattr(block, "hidden_size", None) or _hidden_size(block)
            self.control_gate = dlerp_gate(hidden, gate_init, dlerp_weight_init, generator, device)
        # modules of the frozen block that index the cache by the block's position (the attention)
        self._cache_owners = [m for m in block.modules() if getattr(m, "layer_idx", None) == index]
        twins = [m for m in expanded.modules() if getattr(m, "layer_idx", None) == index]
        for attn, twin in zip(self._cache_owners, twins):
            # The copy's attention shares the frozen attention's forward pre-hooks (the same dicts), so a hook that
            # changes the attention's inputs later, lmadapt's causal-mask removal (models/unmask.py), changes both.
            twin._forward_pre_hooks = attn._forward_pre_hooks
            twin._forward_pre_hooks_with_kwargs = attn._forward_pre_hooks_with_kwargs
        self._enabled = True
        self._merged: str | None = None  # "drop" or "replace" once merged
        self._stash: list[torch.Tensor] = []  # the frozen block's own values while a "replace" merge holds
        self.divergence, self.cosine_margin = divergence, cosine_margin  # what a training forward records
        self._record: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- switching -----------------------------------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        """False: the block gives the frozen block's output only (the base model)."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    # --- the interpolation -------------------------------------------------------------------------------
    def weight(self, h_pre: torch.Tensor, h_exp: torch.Tensor) -> torch.Tensor:
        """w in fp32: sigmoid(f) as a (1,) tensor (lerp), or sigmoid(W_d [h_pre ; h_exp] + b) per token (..., 1)."""
        with _autocast_off(h_pre.device.type):
            if self.control_factor is not None:
                return torch.sigmoid(self.control_factor.float())
            features = torch.cat([h_pre.float(), h_exp.float()], dim=-1)
            gate = self.control_gate
            return torch.sigmoid(F.linear(features, gate.weight.float(), gate.bias.float()))

    def constant_weight(self) -> float | None:
        """w as a number when it does not depend on the input (lerp, or dlerp with W_d = 0), else None."""
        if self.control_factor is not None:
            return float(torch.sigmoid(self.control_factor.detach().float()))
        if torch.count_nonzero(self.control_gate.weight) == 0:
            return float(torch.sigmoid(self.control_gate.bias.detach().float()))
        return None

    def take_record(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(d, w) of the last training forward, per token (d: (B, T); w: (1,) or (B, T, 1)), cleared on reading."""
        record, self._record = self._record, None
        return record

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        frozen = self.frozen_block
        self._sync_frozen()
        if not self._enabled and self._merged == "replace":
            raise LmadaptError(f"block {self.control_index} holds the trained copy's weights since the merge, so it "
                               "cannot give the base model's outputs with the adapter switched off; unmerge first")
        if self._merged is not None or not self._enabled:  # merged "replace": the block holds the copy's weights
            return frozen(*args, **kwargs)
        with self._own_cache_slot(kwargs.get("past_key_values")):
            out_pre = frozen(*args, **kwargs)
        out_exp = self._run_expanded(args, kwargs)
        h_pre, h_exp = _first(out_pre), _first(out_exp)
        w = self.weight(h_pre, h_exp)
        with _autocast_off(h_pre.device.type):
            h = lerp(h_pre, h_exp, w)
            if self.divergence != "none" and self.training and torch.is_grad_enabled():
                d = (mse_divergence(h_pre, h_exp) if self.divergence == "mse"
                     else cosine_divergence(h_pre, h_exp, self.cosine_margin))
                self._record = (d, w)
        return _with_first(out_exp, h)

    def _run_expanded(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The copy (fp32 weights) on the same inputs; under autocast to the activations' dtype when the model
        computes in half precision and no autocast is on."""
        h = args[0] if args else kwargs["hidden_states"]
        device = h.device.type
        if h.dtype != torch.float32 and not torch.is_autocast_enabled(device) \
                and next(self.control_expanded.parameters()).dtype != h.dtype:
            with torch.autocast(device, dtype=h.dtype):
                return self.control_expanded(*args, **kwargs)
        return self.control_expanded(*args, **kwargs)

    def _sync_frozen(self) -> None:
        """The frozen block is outside the module tree: give it the train/eval mode and the gradient-checkpointing
        setting that ``model.train()`` and transformers gave the copy."""
        frozen, twin = self.frozen_block, self.control_expanded
        frozen.training = self.training
        if hasattr(twin, "_gradient_checkpointing_func"):
            frozen._gradient_checkpointing_func = twin._gradient_checkpointing_func
        if getattr(twin, "gradient_checkpointing", False) != getattr(frozen, "gradient_checkpointing", False):
            frozen.gradient_checkpointing = twin.gradient_checkpointing

    @contextlib.contextmanager
    def _own_cache_slot(self, cache: Any) -> Iterator[None]:
        """Inside: the frozen block reads and writes its keys and values at cache layer ``control_slot`` (appended
        to ``cache`` on the first forward, the prompt's) instead of at the block's index, which the copy uses."""
        if cache is None:
            yield
            return
        layers = getattr(cache, "layers", None)
        if layers is None or not self._cache_owners:
            raise LmadaptError(f"control_llm: block {self.control_index} cannot run with this KV cache "
                               f"({type(cache).__name__}): the frozen block needs a cache layer of its own, which "
                               "needs a transformers Cache (5.x) and attention modules that index it by layer_idx; "
                               "generate with use_cache=False")
        if len(layers) <= self.control_slot:
            if len(layers) > self.control_index and cache.get_seq_length(self.control_index) > 0:
                raise LmadaptError(f"control_llm: the KV cache already holds tokens for block {self.control_index} "
                                   "but none for its frozen branch (was it filled by the model without the adapter, "
                                   "or with the adapter switched off?); start generation from an empty cache")
            if getattr(cache, "layer_class_to_replicate", None) is None:  # a cache built for the config's layers
                while len(layers) <= self.control_slot:
                    layers.append(copy.deepcopy(layers[self.control_index]))
        for m in self._cache_owners:
            m.layer_idx = self.control_slot
        try:
            yield
        finally:
            for m in self._cache_owners:
                m.layer_idx = self.control_index

    # --- merging ------------------------------------------------------------------------------------------
    def merge_plan(self) -> str:
        """"drop" (the copy adds nothing: equal to the original, or w = 0), "replace" (w = 1 for every token), or
        why the block cannot be merged exactly."""
        frozen = dict(self.frozen_block.named_parameters())
        twin = dict(self.control_expanded.named_parameters())
        if all(torch.equal(twin[k].detach().to(p.dtype), p.detach()) for k, p in frozen.items()):
            return "drop"
        w = self.constant_weight()
        if w == 0.0:
            return "drop"
        if w == 1.0:
            return "replace"
        where = f"w = {w:.6g}" if w is not None else "w depends on each token (dlerp with W_d != 0)"
        return f"block {self.control_index}: {where}"

    @torch.no_grad()
    def merge(self, plan: str) -> None:
        """Apply a :meth:`merge_plan` ("drop" or "replace"); "replace" writes the copy's weights into the frozen
        block (cast to its dtype), keeping the block's own values to restore on :meth:`unmerge`."""
        if self._merged is not None:
            return
        if plan == "replace":
            twin = dict(self.control_expanded.named_parameters())
            params = list(self.frozen_block.named_parameters())
            self._stash = [p.detach().clone() for _, p in params]
            for name, p in params:
                p.copy_(twin[name])
        self._merged = plan

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged == "replace":
            for (_, p), saved in zip(self.frozen_block.named_parameters(), self._stash):
                p.copy_(saved)
        self._stash, self._merged = [], None

    def extra_repr(self) -> str:
        return f"index={self.control_index}, merge={self.merge_method}, cache_slot={self.control_slot}"


def dlerp_gate(hidden: int, gate_init: float, weight_init: str, generator: torch.Generator | None,
               device: torch.device) -> nn.Linear:
    """dlerp's Linear(2d, 1) in fp32: bias f; W_d zeros, or ("kaiming") nn.Linear's own init U(-1/sqrt(2d),
    1/sqrt(2d)) drawn from ``generator``. Built on "meta" and then filled, so nothing is drawn from the global RNG."""
    gate = nn.Linear(2 * hidden, 1, device="meta", dtype=torch.float32).to_empty(device=device)
    with torch.no_grad():
        if weight_init == "zeros":
            gate.weight.zero_()
        else:
            bound = (2 * hidden) ** -0.5
            gate.weight.copy_(torch.rand(1, 2 * hidden, generator=generator) * 2 * bound - bound)
        gate.bias.fill_(float(gate_init))
    return gate


def _hidden_size(block: nn.Module) -> int:
    """d, the width of the block's output: the input width of its first linear layer."""
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise LmadaptError(f"control_llm: cannot tell the hidden size of {type(block).__name__} (no hidden_size "
                       "attribute and no linear layer)")
