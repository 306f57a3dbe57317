"""LoFiT: localized fine-tuning of attention-head outputs, both of its steps in one run.

"LoFiT: Localized Fine-tuning on LLM Representations", Fangcong Yin, Xi Ye and Greg Durrett, arXiv:2406.01563;
official code github.com/fc2869/lo-fit. Head h of layer l outputs ``z_{l,h}`` (the slice ``h*D:(h+1)*D`` of
``o_proj``'s input, D = d_head), and LoFiT changes it to::

    z' = (1 + A_{l,h}) * z + v_{l,h}     so  o_proj(z') = W z + b + W_h (A_{l,h} * z) + W_h v_{l,h}

with ``W_h = o_proj.weight[:, h*D:(h+1)*D]``; A = v = 0 is the base model. Step 1 trains A on every head (init
N(0, init_std) as the code, or zeros) with ``task loss + l1_lambda * sum |A|``, then ranks the heads by
``||A_{l,h}||_2`` (ties by (layer, head)) and keeps the top K. Step 2 drops A (the paper reloads the base) and
trains v on the K heads only, at ``stage2_lr_scale`` x the run's lr. One run does both: after ``stage1_steps``
:meth:`Lofit.on_step_end` switches and the loop rebuilds the optimizer. The stage and heads are method state (exact
resume) and go into the config's ``heads``, so a saved adapter (v only: K x d_head numbers) reloads as step 2.

The right-hand form is what runs: the scale as the extra product ``W (A * z)``, the offset as the bias ``W_h v``
in fp32 (the same function; in bf16 a small A or v is not rounded away against z). Merge folds A into o_proj's
weight columns and v into its bias; Llama-style o_proj has no bias, so merge refuses v there (not ``mergeable``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.lora import load_tensors
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    plain_linear,
    replace_module,
)

_HEAD = re.compile(r"L(\d+)H(\d+)")


@dataclass
class LofitConfig:
    top_k: int | None = option(None, "K, the heads step 2 tunes. null: floor(top_ratio x heads x layers), at "
                                     "least 1 (the code's default with top_ratio 0.1).")
    top_ratio: float = option(0.1, "K as a fraction of all heads when top_k is null.")
    heads: list[str] = option([], "The heads step 2 tunes, as 'L<layer>H<head>' (layer: position among the "
                                  "adapted modules). Empty: step 1 selects them. Given: step 1 is skipped. A run "
                                  "fills this in at the switch, so a saved adapter records its heads here.")
    stage1_steps: int | None = option(None, "Optimizer steps of step 1 (head selection); null: stage1_fraction "
                                            "of the run's steps.")
    stage1_fraction: float = option(0.5, "Step 1's share of the run when stage1_steps is null (floored, >= 1 "
                                         "step; the paper gives each step the same epochs).")
    l1_lambda: float = option(5e-4, "Step 1's penalty l1_lambda * sum |A| (the paper's Llama-2-7B value).")
    stage2_lr_scale: float = option(2.0, "Step 2's lr is train.lr times this (the paper: 5e-3, then 1e-2).")
    a_init: Literal["normal", "zeros"] = option(
        "normal", "normal: A ~ N(0, init_std) as the code (the output moves slightly at init); zeros: identity.")
    v_init: Literal["normal", "zeros"] = option("normal", "normal: v ~ N(0, init_std) as the code; zeros.")
    init_std: float = option(1e-3, "Standard deviation of the normal inits.")
    seed: int = option(0, "Seed of the A and v inits (a generator of their own; the run's random stream is untouched).")
    output_projections: list[str] = option(["o_proj"], "The attention output projections (nn.Linear whose input is the "
                                                       "heads' outputs side by side), named as lora's target_modules.")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave out among the targets.")

    def check(self) -> list[str]:
        bad = [h for h in self.heads if not _HEAD.fullmatch(str(h))]
        checks = [
            (self.top_k is not None and self.top_k < 1, f"top_k: must be >= 1 (or null: top_ratio), got {self.top_k}"),
            (not 0.0 < self.top_ratio <= 1.0, f"top_ratio: must be in (0, 1], got {self.top_ratio}"),
            (bool(bad), f"heads: {bad[0]!r} is not 'L<layer>H<head>', e.g. 'L12H5'" if bad else ""),
            (len(set(self.heads)) != len(self.heads), "heads: a head is listed twice"),
            (self.stage1_steps is not None and self.stage1_steps < 1,
             f"stage1_steps: must be >= 1 (or null: stage1_fraction), got {self.stage1_steps}"),
            (not 0.0 < self.stage1_fraction < 1.0, f"stage1_fraction: must be in (0, 1), got {self.stage1_fraction}"),
            (self.l1_lambda < 0, f"l1_lambda: must be >= 0, got {self.l1_lambda}"),
            (self.stage2_lr_scale <= 0, f"stage2_lr_scale: must be > 0, got {self.stage2_lr_scale}"),
            (self.init_std <= 0, f"init_std: must be > 0, got {self.init_std}"),
            (not self.output_projections, "output_projections: name the attention output projections, e.g. [o_proj]"),
        ]
        return [message for failed, message in checks if failed]


def parse_heads(names: list[str]) -> list[tuple[int, int]]:
    """'L3H5' -> (3, 5), in the given order."""
    return [(int(m[1]), int(m[2])) for m in (_HEAD.fullmatch(n) for n in names) if m]


def rank_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The top ``k`` (layer, head) of a (layers x heads) score table: highest first, ties by (layer, head)."""
    flat = scores.detach().float().flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return [divmod(i, scores.shape[1]) for i in order[:k]]


class LofitOProj(nn.Module):
    """An attention output projection whose input heads are scaled (step 1) or offset (step 2).

    Holds the original ``weight``/``bias`` Parameters under the same names, so base state-dict keys stay.
    ``lofit_A`` (heads x d_head) exists in step 1 only; ``lofit_v`` (len(heads) x d_head, rows in ``heads``
    order) in step 2 only, and only when this layer has selected heads. Both are fp32, cast per call.
    """

    casts_own_parameters = True

    def __init__(self, base: nn.Linear, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.num_heads, self.head_dim = num_heads, head_dim
        self.lofit_A: nn.Parameter | None = None
        self.lofit_v: nn.Parameter | None = None
        self.heads: list[int] = []  # ascending: the heads whose offsets lofit_v holds
        self._enabled = True
        self._merged = False

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs, merged or not."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def set_scales(self, a: torch.Tensor) -> None:
        """Step 1: A (heads x d_head) on every head, no offsets."""
        self._refuse_if_merged()
        self.lofit_A = nn.Parameter(a.to(torch.float32))
        self.lofit_v, self.heads = None, []

    def set_offsets(self, heads: list[int], v: torch.Tensor) -> None:
        """Step 2: offsets v (len(heads) x d_head) on ``heads`` (ascending), no scales."""
        self._refuse_if_merged()
        self.lofit_A = None
        self.heads = list(heads)
        self.lofit_v = nn.Parameter(v.to(torch.float32)) if heads else None

    def _refuse_if_merged(self) -> None:
        if self._merged:
            raise LmadaptError("a merged LoFiT layer cannot change its parameters; unmerge first")

    def offset(self) -> torch.Tensor:
        """sum over selected heads of W_h v_h: o_proj's output shift (d_out, fp32)."""
        w = self.weight.view(self.out_features, self.num_heads, self.head_dim)[:, self.heads, :]
        return torch.einsum("ohd,hd->o", w.float(), self.lofit_v)

    @torch.no_grad()
    def merge(self, undo: bool = False) -> None:
        """W_h <- W_h diag(1 + A_h) (step 1) or b <- b + sum W_h v_h (step 2), in fp32; ``undo``: the inverse.
        A no-op when already in the wanted state."""
        if self._merged != undo:
            return
        if self.lofit_A is not None:
            w = self.weight.view(self.out_features, self.num_heads, self.head_dim)
            w.copy_(w.float() / (1 + self.lofit_A) if undo else w.float() * (1 + self.lofit_A))
        if self.lofit_v is not None:
            self.bias.copy_(self.bias.float() - self.offset() if undo else self.bias.float() + self.offset())
        self._merged = not undo

    def unmerge(self) -> None:
        """Undo :meth:`merge` (a no-op when not merged)."""
        self.merge(undo=True)

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (a merged update included)."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._enabled == self._merged:  # the stored weights are already the ones this call wants
            return F.linear(x, self.weight, self.bias)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if self.lofit_A is not None:
            # W ((1 + A) z) = W z + W (A z); taking a merged scale out: W' (z / (1 + A)) = W' z + W' (s z)
            s = 1 / (1 + self.lofit_A) - 1 if self._merged else self.lofit_A
            return F.linear(x, self.weight, self.bias) + F.linear(x * s.reshape(-1).to(dtype), self.weight)
        bias = self.bias
        if self.lofit_v is not None:
            shift = -self.offset() if self._merged else self.offset()
            bias = (shift if bias is None else bias.float() + shift).to(dtype)
        return F.linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        stage = "A on every head" if self.lofit_A is not None else f"v on heads {self.heads}"
        return f"in={self.in_features}, out={self.out_features}, heads={self.num_heads}x{self.head_dim}, {stage}"


def head_geometry(model: nn.Module) -> tuple[int, int]:
    """(num_attention_heads, head_dim) from the model's config (head_dim, else hidden_size / heads)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        heads = getattr(cfg, "num_attention_heads", None)
        if isinstance(heads, int) and heads > 0:
            return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    raise LmadaptError("lofit needs the model's config to say num_attention_heads (and head_dim or hidden_size); "
                       "this model has no such config")


@register
class Lofit(Method):
    """LoFiT (Yin et al., arXiv:2406.01563): z' = (1 + A) * z + v on attention-head outputs; step 1 learns A with
    an L1 penalty and keeps the top-K heads by ||A||, step 2 learns v on those heads only."""

    name = "lofit"
    config_class = LofitConfig
    mergeable = False  # v folds into o_proj's bias, which Llama-style models do not have

    def __init__(self, config: LofitConfig) -> None:
        super().__init__(config)
        self.stage = 2 if config.heads else 1
        self.identity_at_init = (config.a_init if self.stage == 1 else config.v_init) == "zeros"

    # --- set-up ----------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        freeze_all(model)
        self.num_heads, self.head_dim = head_geometry(model)
        width = self.num_heads * self.head_dim
        targets = find_modules(model, cfg.output_projections, types=(nn.Linear,), exclude=cfg.exclude_modules)
        wrong = [f"{n} (in_features {m.in_features})" for n, m in targets if m.in_features != width]
        if wrong:
            raise LmadaptError(f"lofit adapts attention output projections, whose input is {self.num_heads} heads x "
                               f"{self.head_dim} = {width} values; {', '.join(wrong)} is not one. Set "
                               f"output_projections to the attention output projection only (o_proj in Llama-style "
                               f"models)")
        self.module_names = [n for n, _ in targets]
        total = len(targets) * self.num_heads
        if self.stage == 1 and self._k() > total:
            raise LmadaptError(f"lofit: top_k={self._k()} is more than the model's {total} heads "
                               f"({len(targets)} layers x {self.num_heads}); choose top_k <= {total}")
        if self.stage == 2:
            self._check_heads(parse_heads(cfg.heads))
        for n, module in targets:
            replace_module(model, n, LofitOProj(module, self.num_heads, self.head_dim))
        if self.stage == 1:
            g = torch.Generator().manual_seed(self.config.seed)
            for _, layer in self._layers(model):
                layer.set_scales(self._draw(g, self.num_heads, cfg.a_init).to(layer.weight.device))
        else:
            self._start_step2(model, parse_heads(cfg.heads), cfg.v_init)

    def _layers(self, model: nn.Module) -> list[tuple[str, LofitOProj]]:
        return list(modules_of_type(model, LofitOProj))

    def _draw(self, g: torch.Generator, rows: int, init: str) -> torch.Tensor:
        """rows x d_head: N(0, init_std) drawn from ``g``, or zeros."""
        if init == "zeros":
            return torch.zeros(rows, self.head_dim)
        return torch.randn(rows, self.head_dim, generator=g) * self.config.init_std

    def _k(self) -> int:
        layers = len(getattr(self, "module_names", []))
        if self.config.top_k is not None:
            return self.config.top_k
        return max(1, math.floor(self.config.top_ratio * layers * self.num_heads + 1e-9))

    def _check_heads(self, heads: list[tuple[int, int]]) -> None:
        n = len(self.module_names)
        out = [f"L{lay}H{h}" for lay, h in heads if lay >= n or h >= self.num_heads]
        if out:
            raise LmadaptError(f"lofit heads {', '.join(out)} do not exist: the model has {n} adapted layers "
                               f"(L0..L{n - 1}) of {self.num_heads} heads (H0..H{self.num_heads - 1})")

    def _start_step2(self, model: nn.Module, heads: list[tuple[int, int]], init: str) -> None:
        """Drop A everywhere; v on ``heads`` only (init from the seeded generator, in (layer, head) order)."""
        self._check_heads(heads)
        layers = self._layers(model)
        g = torch.Generator().manual_seed(self.config.seed + 1)
        for index, (_, layer) in enumerate(layers):
            mine = sorted(h for lay, h in heads if lay == index)
            layer.set_offsets(mine, self._draw(g, len(mine), init).to(layer.weight.device))
        self.config.heads = [f"L{lay}H{h}" for lay, h in heads]
        self.stage = 2

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = [m for _, m in self._layers(model)]
        if self.stage == 1:
            return [ParamGroup("lofit_A", [m.lofit_A for m in layers])]
        return [ParamGroup("lofit_v", [m.lofit_v for m in layers if m.lofit_v is not None],
                           lr_scale=self.config.stage2_lr_scale)]

    # --- the two steps -----------------------------------------------------------------------------------
    def head_scores(self, model: nn.Module) -> torch.Tensor:
        """||A_{l,h}||_2 as a (layers x heads) fp32 table (step 1 only)."""
        if self.stage != 1:
            raise LmadaptError("lofit: head scores exist in step 1 only (A is dropped in step 2)")
        return torch.stack([torch.linalg.vector_norm(m.lofit_A.detach().float(), dim=-1).cpu()
                            for _, m in self._layers(model)])

    def stage1_end(self, max_steps: int) -> int:
        """How many optimizer steps step 1 takes in a run of ``max_steps``."""
        cfg = self.config
        n = cfg.stage1_steps if cfg.stage1_steps is not None else max(1, int(cfg.stage1_fraction * max_steps))
        if n >= max_steps:
            raise LmadaptError(f"lofit: step 1 (head selection) takes {n} of the run's {max_steps} steps, leaving "
                               f"none for step 2 (bias tuning); lower method.stage1_steps or stage1_fraction, or "
                               f"raise train.max_steps")
        return n

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        if self.stage != 1:
            return None
        if ctx.step == 0:
            self.stage1_end(ctx.max_steps)  # a schedule with no step 2 is refused before any update
        if self.config.l1_lambda == 0:
            return None
        return self.config.l1_lambda * sum(m.lofit_A.abs().sum() for _, m in self._layers(ctx.model))

    def on_step_end(self, ctx: StepContext) -> bool:
        if self.stage != 1 or ctx.step + 1 < self.stage1_end(ctx.max_steps):
            return False
        self.select_heads(ctx.model)
        return True

    def select_heads(self, model: nn.Module) -> list[str]:
        """End step 1: rank the heads by ||A||, keep the top K, start step 2 on them. Returns their names."""
        self._start_step2(model, rank_heads(self.head_scores(model), self._k()), self.config.v_init)
        return list(self.config.heads)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "heads": list(self.config.heads)}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        if state.get("stage", 1) == 2 and (self.stage == 1 or state.get("heads") != self.config.heads):
            self._start_step2(model, parse_heads(list(state.get("heads") or [])), "zeros")

    # --- merging -----------------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold A into o_proj's weight columns, v into o_proj's bias; refused (nothing changed) when an o_proj
        with offsets has no bias."""
        no_bias = [n for n, m in self._layers(model) if m.lofit_v is not None and m.bias is None and not m._merged]
        if no_bias:
            raise LmadaptError(
                f"lofit cannot merge into {no_bias[0]}{f' (and {len(no_bias) - 1} more)' if len(no_bias) > 1 else ''}"
                f": its offsets v add the constant o_proj.weight[:, head] @ v to the output, which needs a bias on "
                f"o_proj, and this model's has none (attention_bias false in Llama, Mistral, Gemma and Qwen2 "
                f"configs). Keep the adapter unmerged (lmadapt.load(..., adapter=...)), or train on a base whose "
                f"o_proj has a bias")
        for _, m in self._layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back (a merged update stays in the weights)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    # --- saving ------------------------------------------------------------------------------------------
    def _tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{n}.{key}": p for n, m in self._layers(model)
                for key, p in (("lofit_A", m.lofit_A), ("lofit_v", m.lofit_v)) if p is not None}

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._tensors(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors(self._tensors(model), state, "different base model, or other heads?",
                     note=f" (lofit is in step {self.stage})")

    def adapter_config(self) -> dict[str, Any]:
        return {"lofit_stage": self.stage, "lofit_heads": list(self.config.heads),
                "num_attention_heads": getattr(self, "num_heads", None), "head_dim": getattr(self, "head_dim", None),
                "output_projections": list(getattr(self, "module_names", self.config.output_projections))}
