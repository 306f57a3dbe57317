"""Control LLM: chosen decoder blocks get a trainable parallel copy, interpolated with the frozen original.

"Control LLM: Controlled Evolution for Intelligence Retention in LLM", Haichao Wei et al., arXiv:2501.10979; code
github.com/linkedin/ControlLLM (``utils/model_expander.py``, expand_type "concat"). Of the L blocks, n are expanded
(default: a quarter, ControlLLM's 8 of 32): block ``i_k = floor((k + 1) L / n) - 1``, which is ControlLLM's
``(i + 1) % (L / n) == 0`` when n divides L. Each expanded block outputs lerp or dlerp of the frozen block and its
copy (:mod:`lmadapt.methods.control_llm_layer`); everything else stays frozen. The training loss gains::

    L = L_task + (1 / n) sum_l  sum_t m_t alpha_{l,t} d_{l,t} / sum_t m_t

with d the per-token divergence (MSE or cosine), m the attention mask (real tokens), and alpha = ``divergence_weight``
or, with -1, the interpolation weight w itself (ControlLLM's ``interpolation_loss_alpha = -1``). At init the copy is
exact, so the model is the base model and the divergence is 0.

The adapter holds the copies' weights and the gate parameters under their module names (lmadapt's format; PEFT has
no such method). Merging is exact only where every expanded block picks one branch (w = 1 or 0, or a copy still
equal to the original): :meth:`ControlLlm.merge` does it there and refuses otherwise, and ``lmadapt merge`` refuses
the method before loading anything (``mergeable`` is False).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods._weights import decay_groups
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.control_llm_layer import NOT_EXACT, ControlBlock, expanded_indices
from lmadapt.methods.lora import load_tensors
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    freeze_all,
    modules_of_type,
    pick_blocks,
    replace_module,
    transformer_blocks,
)


@dataclass
class ControlLlmConfig:
    num_expanded_layers: int | None = option(
        None, "n, how many blocks get a trainable copy, spread as block floor((k+1) L / n) - 1 for k < n (every "
              "L/n-th block when n divides L). null: a quarter of the blocks, at least 1 (ControlLLM's 8 of 32).")
    layers: list[int] = option([], "The blocks to expand, by index (negative ones count from the end), instead of "
                                   "num_expanded_layers. []: the spread above.")
    merge_method: Literal["lerp", "dlerp"] = option(
        "lerp", "How a block's output mixes the frozen block's h_pre and the copy's h_exp: lerp: (1-w) h_pre + w h_exp "
                "with w = sigmoid(f), one scalar per block (ControlLLM's SFT default); dlerp: w = sigmoid(W_d [h_pre; "
                "h_exp] + f) per token (its pretraining default).")
    gate_init: float = option(0.0, "f, the gate's start: w = sigmoid(f), 0.5 at f = 0 (ControlLLM's "
                                   "interpolation_factor). lerp: the scalar; dlerp: the bias.")
    train_gate: bool = option(False, "Whether f trains (lerp: the scalar; dlerp: the bias, W_d always trains). "
                                     "false: frozen, as ControlLLM's freeze_interpolation_factor default.")
    dlerp_weight_init: Literal["zeros", "kaiming"] = option(
        "zeros", "dlerp's W_d at init: zeros (w = sigmoid(f) for every token at init), or kaiming: torch's Linear "
                 "init U(-1/sqrt(2d), 1/sqrt(2d)) as ControlLLM (drawn from seed). The output is exact either way: "
                 "h_exp = h_pre at init.")
    seed: int = option(0, "Seed of the kaiming W_d init (a generator of its own; the run's random stream is "
                          "untouched).")
    divergence: Literal["mse", "cosine", "none"] = option(
        "mse", "The loss that keeps each copy near its frozen block, per token: mse: mean_j (h_exp - h_pre)^2; "
               "cosine: smooth_l1(relu(1 - cosine_margin - cos(h_pre, h_exp))); none: no such loss.")
    divergence_weight: float = option(
        1.0, "alpha, the divergence loss's weight (ControlLLM's interpolation_loss_alpha); -1: each token's own "
             "interpolation weight w, as ControlLLM's dynamic alpha; 0: off.")
    cosine_margin: float = option(0.0, "The cosine loss's margin: no loss while cos(h_pre, h_exp) >= 1 - margin.")

    def check(self) -> list[str]:
        checks = [
            (self.num_expanded_layers is not None and self.num_expanded_layers < 1,
             f"num_expanded_layers: must be >= 1 (or null: a quarter of the blocks), got {self.num_expanded_layers}"),
            (bool(self.layers) and self.num_expanded_layers is not None,
             "layers and num_expanded_layers: give one of them, the blocks or how many to spread"),
            (self.divergence_weight < 0 and self.divergence_weight != -1,
             f"divergence_weight: must be >= 0, or -1 for the dynamic weight w, got {self.divergence_weight}"),
            (not 0.0 <= self.cosine_margin < 2.0, f"cosine_margin: must be in [0, 2), got {self.cosine_margin}"),
        ]
        return [message for failed, message in checks if failed]


@register
class ControlLlm(Method):
    """Control LLM (Wei et al., arXiv:2501.10979): expanded blocks h = lerp(h_pre, h_exp, w), a trainable copy beside
    each frozen block, with a divergence loss between the two."""

    name = "control_llm"
    config_class = ControlLlmConfig
    mergeable = False  # exact only where w picks one branch: merge() checks, lmadapt merge refuses

    def __init__(self, config: ControlLlmConfig) -> None:
        super().__init__(config)
        self.indices: list[int] = []  # the expanded blocks, set by apply()
        self._logged: dict[str, list[torch.Tensor]] = {}

    # --- set-up ----------------------------------------------------------------------------------------
    def _choose(self, model: nn.Module) -> tuple[list[str], int]:
        """(dotted names of the blocks to expand, in order; L)."""
        cfg = self.config
        num_blocks = len(transformer_blocks(model))
        if cfg.layers:
            return pick_blocks(model, cfg.layers, "method.layers"), num_blocks
        n = cfg.num_expanded_layers if cfg.num_expanded_layers is not None else max(1, num_blocks // 4)
        if num_blocks and n > num_blocks:
            raise ConfigError([(f"method.num_expanded_layers: {n} is more than the model's {num_blocks} "
                                f"transformer blocks; give 1 to {num_blocks}")])
        indices = expanded_indices(num_blocks, n) if num_blocks else [0]
        return pick_blocks(model, indices, "method.num_expanded_layers"), num_blocks

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        names, num_blocks = self._choose(model)
        freeze_all(model)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.indices = [int(n.rsplit(".", 1)[1]) for n in names]
        for k, (name, index) in enumerate(zip(names, self.indices)):
            block = ControlBlock(model.get_submodule(name), index, num_blocks + k, cfg.merge_method, cfg.gate_init,
                                 dlerp_weight_init=cfg.dlerp_weight_init, generator=generator,
                                 divergence="none" if cfg.divergence_weight == 0 else cfg.divergence,
                                 cosine_margin=cfg.cosine_margin)
            block.control_expanded.requires_grad_(True)
            if block.control_gate is not None:
                block.control_gate.weight.requires_grad_(True)
                block.control_gate.bias.requires_grad_(cfg.train_gate)
            else:
                block.control_factor.requires_grad_(cfg.train_gate)
            replace_module(model, name, block)

    def _blocks(self, model: nn.Module) -> list[tuple[str, ControlBlock]]:
        return list(modules_of_type(model, ControlBlock))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The copies as in full fine-tuning (matrices with weight decay, norms and biases without), the trainable
        gate parameters without weight decay (decay would pull w towards 0.5)."""
        blocks = self._blocks(model)
        named = [(f"{n}.control_expanded.{k}", p) for n, b in blocks for k, p in b.control_expanded.named_parameters()]
        groups = [dataclasses.replace(g, name="control_expanded" if g.name == "decay" else "control_expanded_no_decay")
                  for g in decay_groups(named)]
        gates = [p for _, b in blocks for p in self._gate_parameters(b).values() if p.requires_grad]
        if gates:
            groups.append(ParamGroup("control_gate", gates, weight_decay=0.0))
        return groups

    @staticmethod
    def _gate_parameters(block: ControlBlock) -> dict[str, nn.Parameter]:
        if block.control_factor is not None:
            return {"control_factor": block.control_factor}
        return {"control_gate.weight": block.control_gate.weight, "control_gate.bias": block.control_gate.bias}

    # --- the divergence loss ---------------------------------------------------------------------------
    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """The mean over expanded blocks of sum_t m_t alpha d_t / sum_t m_t, from each block's last training
        forward (the objective's, this micro-batch); m: ``attention_mask`` where it has the tokens' shape."""
        cfg = self.config
        if cfg.divergence == "none" or cfg.divergence_weight == 0:
            return None
        records = [r for _, b in self._blocks(ctx.model) if (r := b.take_record()) is not None]
        if not records:
            return None
        mask = ctx.batch.get("attention_mask")
        terms, raw, weights = [], [], []
        for d, w in records:
            m = mask.to(d.device, torch.float32) if mask is not None and mask.shape == d.shape else torch.ones_like(d)
            units = m.sum().clamp_min(1.0)
            per_token = w.reshape(w.shape[:-1]) if w.dim() == d.dim() + 1 else w.reshape(())
            alpha = per_token if cfg.divergence_weight == -1 else cfg.divergence_weight
            terms.append((alpha * d * m).sum() / units)
            raw.append((d.detach() * m).sum() / units)
            weights.append((per_token.detach() * m).sum() / units if per_token.dim() else per_token.detach())
        loss = torch.stack(terms).mean()
        self._log("divergence", loss.detach())
        self._log("divergence_raw", torch.stack(raw).mean())
        self._log("w", torch.stack(weights).mean())
        return loss

    def _log(self, key: str, value: torch.Tensor) -> None:
        self._logged.setdefault(key, []).append(value)

    def metrics(self) -> dict[str, float]:
        """The step's mean divergence term (as added to the loss), its unweighted value, and the mean w over real
        tokens and expanded blocks; reset on reading."""
        out = {k: float(torch.stack(v).mean()) for k, v in self._logged.items() if v}
        self._logged = {}
        return out

    # --- merging ---------------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold each expanded block into one plain block where that is exact: drop the copy (w = 0, or the copy
        equal to the original) or write the copy's weights into the block (w = 1). Refuses, changing nothing,
        when a block mixes both branches."""
        blocks = self._blocks(model)
        plans = [b.merge_plan() for _, b in blocks]
        refused = [p for p in plans if p not in ("drop", "replace")]
        if refused:
            raise LmadaptError(f"control_llm cannot merge: {NOT_EXACT}. Here {'; '.join(refused)}. Serve the "
                               "adapter unmerged (lmadapt.load(..., adapter=...) or `lmadapt generate --adapter`)")
        for (_, b), plan in zip(blocks, plans):
            b.merge(plan)

    def unmerge(self, model: nn.Module) -> None:
        for _, b in self._blocks(model):
            b.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put the plain blocks back (merged weights stay; an unmerged adapter is discarded)."""
        for name, b in self._blocks(model):
            replace_module(model, name, b.frozen_block)

    # --- saving ----------------------------------------------------------------------------------------
    def _tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        out = {}
        for name, b in self._blocks(model):
            out.update({f"{name}.control_expanded.{k}": p for k, p in b.control_expanded.named_parameters()})
            out.update({f"{name}.{k}": p for k, p in self._gate_parameters(b).items()})
        return out

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._tensors(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors(self._tensors(model), state, "a different base model, or other expanded blocks?",
                     note=f" (expanded blocks {self.indices}, merge_method {self.config.merge_method})")

    def adapter_config(self) -> dict[str, Any]:
        return {"control_llm_layers": list(self.indices), "merge_method": self.config.merge_method}
