"""SpIEL: sparse fine-tuning with a fixed budget of (index, delta) pairs that are dropped and regrown on a schedule.

"Scaling Sparse Fine-Tuning to Large Language Models", Ansell et al., arXiv:2401.16405; reference code:
github.com/AlanAnsell/peft (``src/peft/tuners/sft``). Each adapted linear layer holds k_m flat indices into W0
(d_out x d_in) and k_m trainable fp32 values, zero at init::

    W = W0 + scatter(indices, values),   y = W x + b
    K = floor(density * all model parameters),   k_m = floor(K * numel(W_m) / sum of numel over the adapted W)

Steps s (from 0) with s mod R < S are a selection phase (R = reselection_steps, S = selection_accumulation_steps).
After its last step each layer drops the floor(p k_m) entries with the smallest |value| and grows as many, value 0:

- ``ag``: the phase's first backward keeps the top-k_m of |dL/dW| as candidates; each phase step adds its gradient
  there (sum g, sum g^2, n). The inactive candidates with the largest |sum g| grow (an entry dropped and regrown at
  once stays), with AdamW state ``exp_avg = mean g (1 - beta1^age)``, ``exp_avg_sq = mean g^2 (1 - beta2^age)``.
- ``ma``: SM3 row/column accumulators (arXiv:1901.11150, beta 0), ``u = min(row[r], col[c]) + g^2``,
  ``row[r] = max(row[r], u)`` (col alike); the inactive indices with the largest ``row[r] col[c]`` grow, state 0.

p = 1 at the first selection, then ``rate (1 - t/T)`` or ``rate (1 + cos(pi t/T)) / 2``. The dense dL/dW = g^T x
exists only inside one layer's backward. Merge: ``W.view(-1).scatter_add_``; unmerge restores W0's entries.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.lora import PEFT_PREFIX, key_mismatch
from lmadapt.methods.registry import register
from lmadapt.methods.sparse_delta import SparseDeltaLinear, ag_swap, ma_swap, with_delta
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    replace_module,
)

AG_KEYS = ("spiel_ag_indices", "spiel_ag_sum", "spiel_ag_sumsq", "spiel_ag_steps")  # a phase under way (ag)
SM3_KEYS = ("spiel_sm3_rows", "spiel_sm3_cols")  # the MA accumulators


@dataclass
class SpielConfig:
    density: float = option(0.01, "Trainable fraction of ALL the model's parameters (embeddings included), "
                                  "shared among the adapted layers in proportion to their size.")
    selection: Literal["ag", "ma"] = option("ag", "Regrowth criterion: ag (accumulated gradients, RigL-like) or "
                                                  "ma (SM3 row/column accumulators: momentum approximation).")
    reselection_steps: int = option(20, "A selection phase begins every this many optimizer steps.")
    selection_accumulation_steps: int = option(5, "Steps in each selection phase; drop/regrow at its end.")
    initial_reselection_rate: float = option(0.2, "Fraction of k_m replaced at the start of the schedule (the "
                                                  "first selection replaces all: p = 1).")
    reselection_policy: Literal["linear", "cosine"] = option("linear", "How that fraction decays to 0 over the run.")
    grown_state_age: Literal["step", "phase"] = option(
        "step", "ag: the age in the Adam counter-correction: step (the optimizer's step count: exact for torch's "
                "AdamW) or phase (the phase's steps: METHODS.md's samples / grad_accum).")
    ma_gradient: Literal["active", "dense"] = option(
        "active", "ma: what feeds the accumulators: active (the trained entries' gradients, every step, as the "
                  "reference) or dense (each layer's transient dense gradient, in selection phases).")
    init: Literal["zero", "random"] = option("zero", "zero: the base model at init; random: N(0, 0.02) values "
                                                     "(for tests).")
    seed: int = option(0, "Seed of the initial random indices (each layer's own stream, from its name).")
    target_modules: list[str] = option(["all-linear"], "Linear layers to adapt: trailing dotted names, "
                                       "'re:<regex>' on the full name, or 'all-linear' (all but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")

    def check(self) -> list[str]:
        problems = []
        if not 0.0 < self.density <= 1.0:
            problems.append(f"density: must be in (0, 1], got {self.density}")
        if not 1 <= self.selection_accumulation_steps < self.reselection_steps:
            problems.append(f"selection_accumulation_steps: must be >= 1 and below reselection_steps "
                            f"({self.reselection_steps}), got {self.selection_accumulation_steps}")
        if not 0.0 <= self.initial_reselection_rate <= 1.0:
            problems.append(f"initial_reselection_rate: must be in [0, 1], got {self.initial_reselection_rate}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems


class SpielLinear(nn.Module):
    """A linear layer plus a sparse delta: ``spiel_indices`` (k flat positions in W0, int32 when W0 has fewer than
    2^31 entries) and ``spiel_values`` (k fp32, trained). Holds the base ``weight``/``bias`` under their names.

    ``collect`` says what the backward feeds to the selection statistics: "ag" (candidates), "sm3" (dense
    accumulators) or None. The ``ag_*`` tensors exist only during an ag selection phase."""

    casts_own_parameters = True

    def __init__(self, base: nn.Linear, k: int, cfg: SpielConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        numel, device = base.weight.numel(), base.weight.device
        dtype = torch.int32 if numel < 2**31 else torch.int64
        start = torch.randperm(numel, generator=generator)[:k].sort().values
        self.register_buffer("spiel_indices", start.to(device=device, dtype=dtype), persistent=False)
        self.spiel_values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self.k = k
        if cfg.init == "random":
            with torch.no_grad():
                self.spiel_values.copy_(torch.randn(k, generator=generator) * 0.02)
        if cfg.selection == "ma":
            self.register_buffer("spiel_sm3_rows", torch.zeros(self.out_features, device=device), persistent=False)
            self.register_buffer("spiel_sm3_cols", torch.zeros(self.in_features, device=device), persistent=False)
        self.collect: str | None = None
        self.clear_candidates()
        self.adapter_enabled = True  # False: the base model's outputs, merged or not
        self._merged = False
        self._merged_over: torch.Tensor | None = None  # W0 at the indices while merged: unmerge restores it

    def delta_weight(self) -> torch.Tensor:
        """The dense delta (d_out x d_in, fp32), for tests and inspection only: training never forms it."""
        return with_delta(torch.zeros_like(self.weight, dtype=torch.float32), self.spiel_indices,
                           self.spiel_values.detach(), torch.float32)

    # --- selection statistics ------------------------------------------------------------------------
    def clear_candidates(self) -> None:
        self.ag_indices = self.ag_sum = self.ag_sumsq = self.ag_step = None
        self.ag_steps = 0

    @torch.no_grad()
    def observe(self, dense: torch.Tensor) -> None:
        """One backward's dense dL/dW, during a selection phase (its own statistics only; nothing dense is kept)."""
        flat = dense.reshape(-1)
        if self.collect == "ag":
            if self.ag_indices is None:  # the phase's first backward picks the candidates
                self.ag_indices = torch.topk(flat.abs(), self.k, sorted=False).indices
                self.ag_sum, self.ag_sumsq, self.ag_step = (torch.zeros(self.k, device=flat.device) for _ in range(3))
            self.ag_step += flat[self.ag_indices].float()
        elif self.collect == "sm3":
            u = torch.minimum(self.spiel_sm3_rows[:, None], self.spiel_sm3_cols[None, :]) + dense.float().square()
            self.spiel_sm3_rows.copy_(torch.maximum(self.spiel_sm3_rows, u.amax(1)))
            self.spiel_sm3_cols.copy_(torch.maximum(self.spiel_sm3_cols, u.amax(0)))

    @torch.no_grad()
    def fold_step(self) -> None:
        """Close one optimizer step of an ag phase: its gradient (summed over micro-batches) into the sums."""
        if self.ag_indices is not None:
            self.ag_sum += self.ag_step
            self.ag_sumsq += self.ag_step.square()
            self.ag_steps += 1
            self.ag_step.zero_()

    @torch.no_grad()
    def observe_active(self, grad: torch.Tensor) -> None:
        """SM3's accumulator update from the trained entries' gradient (as the reference's SM3 optimizer)."""
        idx = self.spiel_indices.long()
        rows, cols = idx // self.in_features, idx % self.in_features
        u = torch.minimum(self.spiel_sm3_rows[rows], self.spiel_sm3_cols[cols]) + grad.float().square()
        self.spiel_sm3_rows.scatter_reduce_(0, rows, u, "amax")
        self.spiel_sm3_cols.scatter_reduce_(0, cols, u, "amax")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Indices and values, plus the selection statistics a checkpoint needs to resume exactly."""
        out = {"spiel_indices": self.spiel_indices, "spiel_values": self.spiel_values.detach()}
        if self.ag_indices is not None:
            steps = torch.tensor([self.ag_steps], dtype=torch.int64)
            out.update(zip(AG_KEYS, (self.ag_indices, self.ag_sum, self.ag_sumsq, steps)))
        if hasattr(self, "spiel_sm3_rows"):
            out.update(zip(SM3_KEYS, (self.spiel_sm3_rows, self.spiel_sm3_cols)))
        return out

    def check_tensors(self, name: str, t: dict[str, torch.Tensor]) -> None:
        """Raise, naming the layer, when saved indices/values cannot be this layer's."""
        idx, numel = t["spiel_indices"], self.weight.numel()
        if self._merged:
            raise LmadaptError(f"spiel: {name} is merged; unmerge before loading an adapter into it")
        if idx.shape != self.spiel_indices.shape or t["spiel_values"].shape != self.spiel_values.shape:
            raise ValueError(f"{name}: saved {idx.numel()} entries != model's k={self.k} (another density, base "
                             f"model or target_modules?)")
        if idx.is_floating_point() or int(idx.min()) < 0 or int(idx.max()) >= numel or idx.unique().numel() < self.k:
            raise ValueError(f"{name}.spiel_indices: expected {self.k} distinct integer positions in [0, {numel}) "
                             f"(a damaged or foreign file?)")

    @torch.no_grad()
    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`tensors` gave (the statistics only where present)."""
        self.spiel_indices.copy_(t["spiel_indices"])
        self.spiel_values.copy_(t["spiel_values"])
        self.clear_candidates()
        if AG_KEYS[0] in t:
            self.ag_indices, self.ag_sum, self.ag_sumsq = (t[k].to(self.spiel_values.device) for k in AG_KEYS[:3])
            self.ag_steps, self.ag_step = int(t[AG_KEYS[3]]), torch.zeros_like(self.ag_sum)
        for key in SM3_KEYS:
            if key in t and hasattr(self, key):
                getattr(self, key).copy_(t[key])

    # --- merging ------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W.view(-1).scatter_add_(indices, values); a no-op when merged already."""
        if not self._merged:
            flat, idx = self.weight.view(-1), self.spiel_indices.long()
            self._merged_over = flat[idx].clone()
            flat.scatter_add_(0, idx, self.spiel_values.to(flat.dtype))
            self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put W0's entries back at the indices (bit-exact, unlike subtracting the values)."""
        if self._merged:
            self.weight.view(-1).index_copy_(0, self.spiel_indices.long(), self._merged_over)
            self._merged, self._merged_over = False, None

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (a merged delta included)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_enabled == self._merged:  # the stored weight is already the one this call wants
            return F.linear(x, self.weight, self.bias)
        if self._merged:  # merged, switched off: W0 rebuilt from the entries merge covered
            w = self.weight.clone()
            w.view(-1).index_copy_(0, self.spiel_indices.long(), self._merged_over)
            return F.linear(x, w, self.bias)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return SparseDeltaLinear.apply(x.to(dtype), self.weight, self.bias, self.spiel_values,
                                        self.spiel_indices, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}"


@register
class Spiel(Method):
    """SpIEL (Ansell et al., arXiv:2401.16405): W = W0 + scatter(indices, values), indices dropped by |value| and
    regrown by accumulated gradients (ag) or SM3 row/column accumulators (ma) on a schedule."""

    name = "spiel"
    config_class = SpielConfig
    mergeable = True

    def __init__(self, config: SpielConfig) -> None:
        super().__init__(config)
        self.next_step = 0  # the optimizer step the next backward belongs to

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        total = sum(p.numel() for p in model.parameters())
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)
        sizes = [m.weight.numel() for _, m in targets]
        budget = int(cfg.density * total)
        if budget > sum(sizes):
            raise LmadaptError(f"spiel: density {cfg.density} asks for {budget} entries, more than the "
                               f"{sum(sizes)} weights of the adapted layers; lower density or adapt more layers")
        for (name, module), size in zip(targets, sizes):
            k = int(budget * size / sum(sizes))
            if k < 1:
                raise LmadaptError(f"spiel: {name} ({size} weights) gets no entries at density {cfg.density}; "
                                   f"raise density to at least {sum(sizes) / size / total:.2g} or exclude it")
            gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{name}".encode()))
            replace_module(model, name, SpielLinear(module, k, cfg, gen))
        self._set_collect(model)

    def _layers(self, model: nn.Module) -> list[tuple[str, SpielLinear]]:
        return list(modules_of_type(model, SpielLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise LmadaptError("spiel: multi-process training is not supported (each process would pick its own "
                               "indices from its own gradients); train it in one process")
        return [ParamGroup("spiel", [m.spiel_values for _, m in self._layers(model)])]

    # --- the schedule -------------------------------------------------------------------------------
    def in_phase(self, step: int) -> bool:
        """Whether optimizer step ``step`` (from 0) is in a selection phase."""
        return step % self.config.reselection_steps < self.config.selection_accumulation_steps

    def replacement_fraction(self, done: int, total: int) -> float:
        """p after ``done`` optimizer steps of ``total``: 1 at the first selection, then decaying to 0."""
        cfg = self.config
        if done == cfg.selection_accumulation_steps:
            return 1.0
        t = min(1.0, done / max(1, total))
        decay = 1 - t if cfg.reselection_policy == "linear" else (1 + math.cos(math.pi * t)) / 2
        return cfg.initial_reselection_rate * decay

    def _set_collect(self, model: nn.Module) -> None:
        cfg, on = self.config, self.in_phase(self.next_step)
        mode = "ag" if cfg.selection == "ag" else ("sm3" if cfg.ma_gradient == "dense" else None)
        for _, m in self._layers(model):
            m.collect = mode if on else None

    def on_step_end(self, ctx: StepContext) -> bool:
        cfg, layers = self.config, self._layers(ctx.model)
        for _, m in layers:
            if cfg.selection == "ag" and self.in_phase(ctx.step):
                m.fold_step()
            if cfg.selection == "ma" and cfg.ma_gradient == "active" and m.spiel_values.grad is not None:
                m.observe_active(m.spiel_values.grad)
        if ctx.step % cfg.reselection_steps == cfg.selection_accumulation_steps - 1:
            p = self.replacement_fraction(ctx.step + 1, ctx.max_steps)
            for _, m in layers:
                self._reselect(m, p, ctx.optimizer)
        self.next_step = ctx.step + 1
        self._set_collect(ctx.model)
        return False  # one fixed-size values tensor per layer: the optimizer keeps it, state edited in place

    @torch.no_grad()
    def _reselect(self, m: SpielLinear, p: float, optimizer: torch.optim.Optimizer | None) -> None:
        """Drop and regrow floor(p k) entries of ``m``; write the grown entries' AdamW state in place."""
        n, values = int(p * m.k), m.spiel_values
        state = optimizer.state.get(values, {}) if optimizer is not None else {}
        moments: tuple[Any, Any] = (0.0, 0.0)  # ma: grown entries start from zero moments
        if self.config.selection == "ma":
            pos, new = ma_swap(m.spiel_indices, values, m.spiel_sm3_rows, m.spiel_sm3_cols, n)
        elif m.ag_indices is None:  # no gradient reached this layer in the phase
            return
        else:
            pos, best = ag_swap(m.spiel_indices, values, m.ag_indices, m.ag_sum.abs(), n)
            new = m.ag_indices[best]
            if "step" in state:
                beta1, beta2 = next(g["betas"] for g in optimizer.param_groups if any(q is values for q in g["params"]))
                age = float(state["step"]) if self.config.grown_state_age == "step" else float(m.ag_steps)
                moments = (m.ag_sum[best] / m.ag_steps * (1 - beta1**age),
                           m.ag_sumsq[best] / m.ag_steps * (1 - beta2**age))
            m.clear_candidates()
        m.spiel_indices[pos] = new.to(m.spiel_indices.dtype)
        values[pos] = 0.0
        for key, value in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (*moments, moments[1])):
            if key in state:
                state[key][pos] = value

    # --- state across a resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.next_step = int(state.get("next_step", 0))
        self._set_collect(model)

    # --- merging and saving ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back (a merged delta stays in the weights)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per layer ``spiel_indices`` and ``spiel_values``, plus the selection statistics a checkpoint needs."""
        return {f"{PEFT_PREFIX}{n}.{k}": v for n, m in self._layers(model) for k, v in m.tensors().items()}

    def export(self, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]] | None:
        """The final adapter: indices and values only (no selection statistics)."""
        state = self.adapter_state(model)
        kept = {k: v for k, v in state.items() if k.endswith((".spiel_indices", ".spiel_values"))}
        return (self, kept) if len(kept) < len(state) else None

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        layers = {f"{PEFT_PREFIX}{n}": m for n, m in self._layers(model)}
        needed = {f"{p}.spiel_{k}" for p in layers for k in ("indices", "values")}
        optional = {f"{p}.{k}" for p in layers for k in AG_KEYS + SM3_KEYS}
        missing, unexpected = needed - state.keys(), state.keys() - needed - optional
        if missing or unexpected:
            raise KeyError(key_mismatch(missing, unexpected))
        per_layer = {p: {k.removeprefix(f"{p}."): v for k, v in state.items() if k.rpartition(".")[0] == p}
                     for p in layers}
        for p, m in layers.items():  # every layer checked before any changes
            m.check_tensors(p.removeprefix(PEFT_PREFIX), per_layer[p])
        for p, m in layers.items():
            m.load_tensors(per_layer[p])
