"""LaMDA / LaMDA++: a frozen first projection, a small trainable core and a gradually frozen second projection.

"LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation", Azizi, Kundu and
Pedram, arXiv:2406.12832::

    y = W_res x + b + s B S A x,   A: r x d_in (frozen),  S: r x r,  B: d_out x r,   s = alpha / r

Spectral init (default): with the fp32 SVD ``W0 = U Sigma V^T``, ``A = V_r^T``, ``B = U_r``,
``S = diag(Sigma_r) / s`` (so ``s B S A = U_r Sigma_r V_r^T`` whatever alpha is) and
``W_res = W0 - s B0 S0 A``: outputs are unchanged at init. ``init: zero`` keeps ``W_res = W0`` and starts
``S = 0`` (A and B still from the SVD). The frozen start ``B0 S0`` stays in the layer, so switching the
adapter off gives W0's outputs and the change can be exported as a plain LoRA of the unmodified base:
``Delta W = s (B S - B0 S0) A``.

B's columns freeze one at a time in singular-value order (the released code's ``gradual_freeze_B``); once all
are frozen only the r x r cores train. LaMDA++ (``rank_allocation: spectrum``) gives each module its own rank
from its singular spectrum under the same total (:func:`spectrum_ranks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.lora import PEFT_PREFIX, key_mismatch
from lmadapt.methods.registry import build_method, register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    plain_linear,
    replace_module,
)

KEYS = ("lamda_A", "lamda_B0S0", "lamda_B", "lamda_S")  # the own saved form: <module>.<key>


@dataclass
class LamdaConfig:
    r: int = option(64, "Rank r of the path B S A in every module (with rank_allocation: spectrum, the mean rank).")
    alpha: float = option(16.0, "Scale numerator: the path is multiplied by s = alpha / r (the module's own r).")
    init: Literal["spectral", "zero", "random"] = option(
        "spectral", "spectral: A, B, S from the SVD of W0, W_res = W0 - U_r Sigma_r V_r^T (rewrites the base "
        "weights); zero: A, B from the SVD, S = 0, W0 untouched; random: spectral with S perturbed (not identity "
        "at init; for tests).")
    freeze_eta: float = option(0.3, "B is fully frozen after round(freeze_eta * max_steps) optimizer steps, one "
                                    "column at a time in singular-value order.")
    freeze_period: int | None = option(None, "Optimizer steps per frozen column of B, instead of freeze_eta; "
                                             "0: B never freezes.")
    rank_allocation: Literal["uniform", "spectrum"] = option(
        "uniform", "uniform: rank r everywhere (LaMDA); spectrum: per-module ranks from each weight's singular "
        "spectrum, summing to r per module (LaMDA++).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj'), 're:<regex>' on the full name, or 'all-linear'.")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    export: bool = option(True, "Write the run's final adapter as a plain LoRA of the unmodified base (the change "
                                "s (B S - B0 S0) A), which PEFT, vLLM and lmadapt's lora load; false: the own form.")

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            problems.append(f"alpha: must be > 0 (the spectral init divides by s = alpha/r), got {self.alpha}")
        if self.freeze_eta <= 0:
            problems.append(f"freeze_eta: must be > 0 (to never freeze B, set freeze_period: 0), got {self.freeze_eta}")
        if self.freeze_period is not None and self.freeze_period < 0:
            problems.append(f"freeze_period: must be >= 0 (0: never freeze), got {self.freeze_period}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems


class LamdaLinear(nn.Module):
    """A linear layer with the LaMDA path ``s B S A x``; ``weight``/``bias`` are the base Parameters (W_res).

    ``frozen_columns`` leading columns of B are frozen: detached in the forward (no gradient), and the method
    restores them after each optimizer step (AdamW's momentum and weight decay would still move them).
    """

    casts_own_parameters = True  # the fp32 factors run in the activations' dtype (see _path)

    def __init__(self, base: nn.Linear, r: int, alpha: float, init: str) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.alpha = alpha
        self.frozen_columns = 0
        self._enabled, self._merged = True, False
        self._cached: tuple | None = None
        with torch.no_grad():
            u, sigma, vh = torch.linalg.svd(self.weight.detach().float(), full_matrices=False)
            core = torch.diag(sigma[:r]) / (alpha / r) if init != "zero" else sigma.new_zeros(r, r)
            self._set_factors(vh[:r], u[:, :r], core)
            if init != "zero":  # W_res = W0 - s B0 S0 A
                self._rebase(0.0)
            if init == "random":
                self.lamda_S.add_(torch.randn_like(self.lamda_S), alpha=0.02)

    @property
    def rank(self) -> int:
        return self.lamda_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _set_factors(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, b0s0: torch.Tensor | None = None) -> None:
        """New fp32 factors; the start B0 S0 is ``b0s0``, else B S (computed as the forward computes it)."""
        own = {"device": self.weight.device, "dtype": torch.float32, "copy": True}  # never a view of the source
        self.lamda_A = nn.Parameter(a.detach().to(**own).contiguous(), requires_grad=False)
        self.lamda_B = nn.Parameter(b.detach().to(**own).contiguous(), requires_grad=self.frozen_columns < a.shape[0])
        self.lamda_S = nn.Parameter(s.detach().to(**own).contiguous())
        start = self.lamda_B @ self.lamda_S if b0s0 is None else b0s0
        self.register_buffer("lamda_B0S0", start.detach().to(**own))
        self._cached = None

    def _rebase(self, old_start: torch.Tensor | float) -> None:
        """W_res += s_old B0S0_old A_old - s B0 S0 A (``old_start`` is the first term; fp32, one rounding)."""
        w = self.weight
        w.copy_((w.float() + old_start - self.scaling * (self.lamda_B0S0 @ self.lamda_A)).to(w.dtype))

    def load_factors(self, a: torch.Tensor, b0s0: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> None:
        """Take saved factors (their rank may differ from this layer's). The residual is re-based on the saved
        start, so W_res + s B0 S0 A is this base again even where this machine's SVD (redone by apply) differs
        from the saving one in the last bits; when they are equal nothing is recomputed (a resume is exact)."""
        with torch.no_grad():
            device = self.lamda_A.device
            same = torch.equal(a.to(device), self.lamda_A) and torch.equal(b0s0.to(device), self.lamda_B0S0)
            old_start = None if same else self.scaling * (self.lamda_B0S0 @ self.lamda_A)
            self._set_factors(a, b, s, b0s0)
            if old_start is not None:
                self._rebase(old_start)

    def freeze_columns(self, k: int) -> None:
        """Freeze B's first ``k`` columns; with all of them frozen B leaves the trainable set."""
        self.frozen_columns = k
        self.lamda_B.requires_grad_(k < self.rank)

    def delta_weight(self) -> torch.Tensor:
        """s B S A in fp32: what merging adds to W_res."""
        return self.scaling * (self.lamda_B @ self.lamda_S @ self.lamda_A)

    def lora_factors(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B') of the change since the start as a LoRA of the unmodified base with ``rank`` >= this rank
        and scale ``scaling``: scaling B' A = s (B S - B0 S0) A, zero-padded to ``rank``."""
        with torch.no_grad():
            b = (self.lamda_B @ self.lamda_S - self.lamda_B0S0) * (self.scaling / scaling)
            pad = rank - self.rank
            return F.pad(self.lamda_A, (0, 0, 0, pad)), F.pad(b, (0, pad))

    # --- switching and merging -----------------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs (W_res + s B0 S0 A), merged or not."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def merge(self) -> None:
        """W_res += s B S A (a no-op when merged already)."""
        if not self._merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self._merged = True

    def unmerge(self) -> None:
        """W -= s B S A (a no-op when not merged)."""
        if self._merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self._merged = False

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` on this layer's Parameters: merged, the base plus the learned change; not
        merged, the base again (the start s B0 S0 A is added back into the residual)."""
        if not self._merged:
            with torch.no_grad():
                self.weight += (self.scaling * (self.lamda_B0S0 @ self.lamda_A)).to(self.weight.dtype)
        return plain_linear(self)

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self._enabled and self._merged:
            return out
        a, ct = self._path(x.dtype)
        low = F.linear(x, a).reshape(-1, a.shape[0])
        if torch.is_grad_enabled():
            return torch.addmm(out.reshape(-1, self.out_features), low, ct).view(out.shape)
        out.view(-1, self.out_features).addmm_(low, ct)  # no autograd: accumulate into the fresh output
        return out

    def _coefficient(self) -> torch.Tensor:
        """C (d_out x r, fp32) with ``out = weight x + s C A x``: B S when on; B0 S0 when off (the base);
        B0 S0 - B S when off while merged."""
        k = self.frozen_columns
        b = self.lamda_B
        if 0 < k < self.rank and torch.is_grad_enabled():  # frozen columns get no gradient
            b = torch.cat([b[:, :k].detach(), b[:, k:]], dim=1)
        if self._enabled:
            return b @ self.lamda_S
        return self.lamda_B0S0 - b @ self.lamda_S if self._merged else self.lamda_B0S0

    def _path(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, (s C)^T) in the dtype the path runs in: the autocast dtype under autocast, else the activations'.
        Outside autograd the cast pair is cached until a factor or the on/merged state changes."""
        device_type = self.lamda_A.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        key = (self.lamda_A._version, self.lamda_B._version, self.lamda_S._version, self.lamda_B0S0._version,
               self._enabled, self._merged, dtype)
        if not torch.is_grad_enabled() and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        with torch.autocast(device_type, enabled=False):  # B S in fp32 whatever autocast says
            coef = self._coefficient() * self.scaling
        pair = self.lamda_A.to(dtype), coef.to(dtype).t()
        if not torch.is_grad_enabled():
            self._cached = (key, (pair[0], pair[1].contiguous()))
            return self._cached[1]
        return pair

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, scaling={self.scaling:g}, "
                f"frozen_columns={self.frozen_columns}")


def spectrum_ranks(spectra: Sequence[torch.Tensor], r: int) -> list[int]:
    """LaMDA++ ranks (the rule is our reading, see docs/methods/lamda.md): module l's score is the share of its
    normalised singular spectrum outside its top r directions, ``e_l = 1 - sum_{i<r} sigma_i / sum_j sigma_j``;
    ranks are proportional to e_l, rounded by largest remainders so that they sum to ``r * len(spectra)``, each
    in [1, len(sigma_l)]."""
    n, total = len(spectra), r * len(spectra)
    caps = [len(s) for s in spectra]
    scores = [float(1 - s[:r].sum() / s.sum()) if float(s.sum()) > 0 else 0.0 for s in spectra]
    if sum(scores) <= 0:
        return [r] * n
    ideal = [total * e / sum(scores) for e in scores]
    ranks = [min(cap, max(1, math.floor(x))) for x, cap in zip(ideal, caps)]
    while sum(ranks) != total:  # largest remainders first; caps and the floor of 1 may push either way
        grow = sum(ranks) < total
        pool = [i for i in range(n) if (ranks[i] < caps[i] if grow else ranks[i] > 1)]
        pick = max if grow else min
        i = pick(pool, key=lambda j: ideal[j] - ranks[j])
        ranks[i] += 1 if grow else -1
    return ranks


@register
class Lamda(Method):
    """LaMDA (arXiv:2406.12832): y = W_res x + s B S A x, A frozen, S trained, B frozen column by column."""

    name = "lamda"
    config_class = LamdaConfig
    mergeable = True
    rewrites_base_weights = True  # the spectral init (the default); an instance says False for init: zero

    def __init__(self, config: LamdaConfig) -> None:
        super().__init__(config)
        self.rewrites_base_weights = config.init != "zero"
        self.frozen_columns: dict[str, int] = {}  # module -> frozen leading columns of its B (resume state)
        self._held: list[tuple[LamdaLinear, torch.Tensor]] = []

    def apply(self, model: nn.Module) -> None:
        """Freeze the base and put a :class:`LamdaLinear` (SVD in fp32) in place of every target."""
        cfg = self.config
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules)
        for name, module in targets:
            if cfg.r > min(module.in_features, module.out_features):
                raise LmadaptError(f"method lamda: {name} is {module.out_features} x {module.in_features}, narrower "
                                   f"than r={cfg.r}; choose r <= {min(module.in_features, module.out_features)} "
                                   f"or leave it out (exclude_modules)")
        ranks = [cfg.r] * len(targets)
        if cfg.rank_allocation == "spectrum":
            with torch.no_grad():
                ranks = spectrum_ranks([torch.linalg.svdvals(m.weight.detach().float()) for _, m in targets], cfg.r)
        self.module_names = [n for n, _ in targets]
        self.frozen_columns = {n: 0 for n in self.module_names}
        for (name, module), r in zip(targets, ranks):
            replace_module(model, name, LamdaLinear(module, r, cfg.alpha, cfg.init))

    def _layers(self, model: nn.Module) -> list[tuple[str, LamdaLinear]]:
        return list(modules_of_type(model, LamdaLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = [m for _, m in self._layers(model)]
        trained_b = [m.lamda_B for m in layers if m.lamda_B.requires_grad]
        return [ParamGroup("lamda", [m.lamda_S for m in layers] + trained_b)]

    # --- gradual freezing of B ---------------------------------------------------------------------------
    def _frozen_after(self, steps: int, rank: int, max_steps: int) -> int:
        """How many of B's columns are frozen after ``steps`` optimizer steps."""
        period = self.config.freeze_period
        if period is not None:
            return 0 if period == 0 else min(rank, steps // period)
        full = max(1, round(self.config.freeze_eta * max_steps))  # integer steps: no float rounding at the edges
        return min(rank, steps * rank // full)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Keep the frozen columns of each still-trainable B, to put back after the step."""
        self._held = [(m, m.lamda_B[:, :m.frozen_columns].detach().clone()) for _, m in self._layers(ctx.model)
                      if m.frozen_columns and m.lamda_B.requires_grad]

    def after_optimizer_step(self, ctx: StepContext) -> None:
        with torch.no_grad():
            for m, columns in self._held:
                m.lamda_B[:, :columns.shape[1]].copy_(columns)
        self._held = []

    def on_step_end(self, ctx: StepContext) -> bool:
        """Freeze the columns due after this step; True when some B left the trainable set."""
        changed = False
        for name, m in self._layers(ctx.model):
            k = self._frozen_after(ctx.step + 1, m.rank, ctx.max_steps)
            if k != m.frozen_columns:
                was = m.lamda_B.requires_grad
                m.freeze_columns(k)
                self.frozen_columns[name] = k
                changed |= was and not m.lamda_B.requires_grad
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_columns": dict(self.frozen_columns)}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Freeze the saved number of B's columns in every module (B leaves the trainable set when all are)."""
        frozen = state.get("frozen_columns", {})
        layers = dict(self._layers(model))
        if set(frozen) != set(layers):
            odd = sorted(set(frozen) ^ set(layers))
            raise KeyError(f"the saved frozen-column counts do not name this model's LaMDA modules (e.g. {odd[0]})")
        for name, k in frozen.items():
            layers[name].freeze_columns(int(k))
            self.frozen_columns[name] = int(k)

    # --- merging and saving ------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Plain ``nn.Linear`` layers again: a merged adapter stays in the weights, an unmerged one is removed
        and the base weights come back."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A, the start B0 S0, B and S of every module (the own form, which checkpoints keep)."""
        return {f"{PEFT_PREFIX}{n}.{k}": getattr(m, k).detach() for n, m in self._layers(model) for k in KEYS}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Check every module's saved tensors first, then load them (:meth:`LamdaLinear.load_factors`)."""
        layers = dict(self._layers(model))
        expected = {f"{PEFT_PREFIX}{n}.{k}" for n in layers for k in KEYS}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise KeyError(key_mismatch(missing, unexpected) + " (an adapter exported as plain LoRA loads as lora)")
        saved = {n: [state[f"{PEFT_PREFIX}{n}.{k}"] for k in KEYS] for n in layers}
        for name, m in layers.items():
            r = saved[name][0].shape[0]
            want = [(r, m.in_features), (m.out_features, r), (m.out_features, r), (r, r)]
            for key, t, shape in zip(KEYS, saved[name], want):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name}.{key}: saved shape {tuple(t.shape)} does not fit a "
                                     f"{m.out_features} x {m.in_features} layer of rank {r} (another base model?)")
            if r != m.rank and self.config.rank_allocation == "uniform":
                raise ValueError(f"{name}: saved rank {r} != r={self.config.r} (the adapter was trained with "
                                 f"another r; use that r)")
        for name, m in layers.items():
            m.load_factors(*saved[name])

    def export(self, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]] | None:
        """The change since the start, ``s (B S - B0 S0) A``, as a plain LoRA of the unmodified base: lora_A = A,
        lora_B = B S - B0 S0, rank max_l r_l (smaller ranks zero-padded, B' rescaled so every module keeps
        its s_l = alpha / r_l) and the same alpha."""
        if not self.config.export:
            return None
        layers = self._layers(model)
        rank = max(m.rank for _, m in layers)
        plain = build_method({"name": "lora", "r": rank, "alpha": self.config.alpha,
                              "target_modules": [n for n, _ in layers]})  # full names: exactly these modules
        state = {}
        for name, m in layers:
            a, b = m.lora_factors(rank, self.config.alpha / rank)
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        return plain, state
