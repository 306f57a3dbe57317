"""The LoRA layer: a linear layer plus one or more named low-rank updates, switchable per call and per row.

"LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685::

    y = W x + b + sum_{n active, not merged} s_n B_n A_n dropout(x) - sum_{m merged, not active} s_m B_m A_m x

With one adapter, active and unmerged (training), that is ``W0 x + b + s B A dropout(x)`` as one fused
``addmm``. :mod:`lmadapt.methods.lora` is the method that puts these layers into a model;
:mod:`lmadapt.adapters.pool` switches, routes and deletes named adapters model-wide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.models.tree import plain_linear

DEFAULT_ADAPTER = "default"
RESIDUAL = "<residual>"  # in a layer's per-call plan: add back what a PiSSA-style start took out of the weight


@dataclass
class LowRankConfig:
    """The fields every LoRA-shaped method shares (LoRA itself, and the methods that start it differently)."""

    r: int = option(8, "Rank of the update B A.")
    alpha: float = option(16.0, "Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = option(0.0, "Dropout on the adapter's input (training only).")
    rslora: bool = option(False, "Use the rank-stabilised scale alpha/sqrt(r).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj', 'self_attn.q_proj'), 're:<regex>' on "
        "the full name, or 'all-linear' (every linear layer but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")
    lr_ratio_b: float = option(1.0, "Learning-rate multiplier for B relative to A (LoRA+ uses ~16).")

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class LoraConfig(LowRankConfig):
    init: Literal["default", "gaussian", "random"] = option(
        "default", "default: A Kaiming-uniform, B = 0 (PEFT's default); gaussian: A ~ N(0, 1/r), B = 0; "
        "random: B random too (not identity at init; for tests).")


def add_factors(holder: nn.Module, in_features: int, out_features: int, cfg: LowRankConfig,
                device: torch.device, trainable: bool) -> None:
    """Give ``holder`` one adapter's ``lora_A``/``lora_B`` (fp32), ``scaling`` and ``dropout``, initialised."""
    factory = {"device": device, "dtype": torch.float32}
    holder.lora_A = nn.Parameter(torch.empty(cfg.r, in_features, **factory), requires_grad=trainable)
    holder.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r, **factory), requires_grad=trainable)
    holder.scaling = cfg.scaling
    holder.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    _init_factors(holder.lora_A, holder.lora_B, getattr(cfg, "init", "default"))


def _init_factors(a: nn.Parameter, b: nn.Parameter, init: str) -> None:
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(b, std=0.02)
        else:
            b.zero_()


class LoraFactors(nn.Module):
    """A further named adapter in a :class:`LoraLinear`: its own A, B, scale and dropout."""

    casts_own_parameters = True  # run in the activations' dtype, like the layer's own factors

    def __init__(self, in_features: int, out_features: int, cfg: LowRankConfig, device: torch.device,
                 trainable: bool) -> None:
        super().__init__()
        add_factors(self, in_features, out_features, cfg, device, trainable)


class ResidualFactors(nn.Module):
    """The frozen factors (A0, B0, s0) a PiSSA-style start took out of a layer's weight (W = W0 - s0 B0 A0)."""

    casts_own_parameters = True

    def __init__(self, a0: torch.Tensor, b0: torch.Tensor, scaling: float) -> None:
        super().__init__()
        # row-major whatever the SVD/QR gave (a transposed view): a start restored from a file is row-major, and
        # the same values in another layout take another GEMM kernel, so a resumed run would round differently
        self.lora_A = nn.Parameter(a0.detach().float().clone(memory_format=torch.contiguous_format),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(b0.detach().float().clone(memory_format=torch.contiguous_format),
                                   requires_grad=False)
        self.scaling = scaling
        self.dropout = nn.Identity()


class RowRouting:
    """Which adapter each batch row runs through (None: the base model): rows grouped by name, each
    group's index tensor made once per device and shared by every layer."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = tuple(names)
        self.groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(self.names):
            self.groups.setdefault(name, []).append(row)
        self._index: dict[tuple[str | None, torch.device], torch.Tensor] = {}

    def rows(self, name: str | None, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._index:
            self._index[key] = torch.tensor(self.groups[name], device=device)
        return self._index[key]


class LoraLinear(nn.Module):
    """A linear layer plus one or more named low-rank updates.

    Holds the original ``weight``/``bias`` Parameters under the same names, so the base model's
    state-dict keys do not change. The adapter named ``"default"`` keeps its factors as the layer's own
    ``lora_A``/``lora_B`` (what training, checkpoints and the optimizer see); further named adapters
    live in ``extra_adapters[name]``. A layer may lack the default adapter (its ``lora_A`` is None).

    Each call adds ``s_n B_n A_n x`` for every active adapter n that is not merged and takes
    ``s_m B_m A_m x`` back out for every merged adapter m that is not active, so merged and unmerged
    adapters can be switched on and off exactly. With :attr:`routing` set, each batch row uses its own
    adapter (or none).
    """

    casts_own_parameters = True  # the fp32 factors run in the activations' dtype (see _factors)

    def __init__(self, base: nn.Linear, cfg: LowRankConfig, name: str = DEFAULT_ADAPTER,
                 trainable: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.register_parameter("lora_A", None)  # the default adapter's factors, when the layer has it
        self.register_parameter("lora_B", None)
        self.scaling = 0.0
        self.dropout: nn.Module = nn.Identity()
        self.extra_adapters = nn.ModuleDict()
        self.routing: RowRouting | None = None  # set by lmadapt.adapters.pool.adapter_per_row
        self._active: tuple[str, ...] = (name,)
        self._enabled = True
        self._disabled: frozenset[str] = frozenset()
        self._merged: set[str] = set()
        self._plan: tuple[tuple[str, float], ...] | None = None  # (adapter, +1 add / -1 take out) per call
        self._cached: dict[str, tuple] = {}  # inference-time cast factors per adapter, see _factors
        # Set by start_from (PiSSA, OLoRA, CorDA): weight holds W0 - s0 B0 A0, and whenever adapter
        # _residual_owner is not in effect the call adds s0 B0 A0 x back, so the base model's outputs stay reachable.
        self.residual: ResidualFactors | None = None
        self._residual_owner: str | None = None
        self.add_adapter(name, cfg, trainable)

    # --- which adapters the layer holds --------------------------------------------------------------
    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters this layer holds, the default first."""
        own = (DEFAULT_ADAPTER,) if self.lora_A is not None else ()
        return own + tuple(self.extra_adapters.keys())

    def factors(self, name: str) -> nn.Module:
        """The module holding adapter ``name``'s ``lora_A``, ``lora_B``, ``scaling`` and ``dropout``."""
        if name == DEFAULT_ADAPTER and self.lora_A is not None:
            return self
        if name in self.extra_adapters:
            return self.extra_adapters[name]
        raise KeyError(f"this layer holds no LoRA adapter named {name!r} (it holds {list(self.adapter_names)})")

    def add_adapter(self, name: str, cfg: LowRankConfig, trainable: bool = True) -> None:
        """Add adapter ``name`` (config ``cfg``); frozen unless ``trainable``."""
        if name in self.adapter_names:
            raise ValueError(f"this layer already holds a LoRA adapter named {name!r}")
        if name == DEFAULT_ADAPTER:
            add_factors(self, self.in_features, self.out_features, cfg, self.weight.device, trainable)
        else:
            self.extra_adapters[name] = LoraFactors(self.in_features, self.out_features, cfg,
                                                    self.weight.device, trainable)
        self.train(self.training)  # the new dropout follows the layer's mode
        self._forget(name)

    def start_from(self, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Start adapter ``name`` at A = ``a0``, B = ``b0`` and take s B0 A0 out of the weight (PiSSA, OLoRA,
        CorDA): the layer's output is unchanged, and the frozen (A0, B0) give the base output back whenever
        the adapter is not in effect. Computed in fp32, stored in the weight's dtype."""
        f = self.factors(name)
        old = self._residual_delta() if self.residual is not None else 0.0
        with torch.no_grad():
            f.lora_A.copy_(a0)
            f.lora_B.copy_(b0)
            self.residual = ResidualFactors(a0.to(self.weight.device), b0.to(self.weight.device), f.scaling)
            # old - new is exactly 0 when a load restores the start it was saved with: the weight does not move
            self.weight.copy_((self.weight.float() + (old - self._residual_delta())).to(self.weight.dtype))
        self._residual_owner = name
        self._cached.clear()
        self._plan = None

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s factors. The weight is left as it is: a merged adapter stays folded in.
        The adapter a PiSSA-style start belongs to gives back what it took out of the weight when it is not merged
        (the base model returns), and leaves it out when merged (the weight is then the merged model)."""
        self.factors(name)  # raises for an unknown name
        if name == self._residual_owner:
            if name not in self._merged:
                with torch.no_grad():
                    self.weight += self._residual_delta().to(self.weight.dtype)
            self.residual, self._residual_owner = None, None
        if name in self.extra_adapters:
            del self.extra_adapters[name]
        else:
            self.lora_A = self.lora_B = None
            self.scaling, self.dropout = 0.0, nn.Identity()
        self._merged.discard(name)
        self._forget(name)

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (merged adapters included)."""
        return plain_linear(self)

    def reset_adapter(self, init: str, name: str = DEFAULT_ADAPTER) -> None:
        """Re-initialise adapter ``name``'s factors (``init`` as in :class:`LoraConfig`)."""
        f = self.factors(name)
        _init_factors(f.lora_A, f.lora_B, init)

    def delta_weight(self, name: str = DEFAULT_ADAPTER) -> torch.Tensor:
        """s B A of adapter ``name``, in fp32."""
        f = self.factors(name)
        return (f.lora_B.float() @ f.lora_A.float()) * f.scaling

    def _residual_delta(self) -> torch.Tensor:
        r = self.residual
        return (r.lora_B.float() @ r.lora_A.float()) * r.scaling

    # --- switching and merging -----------------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs, whatever is active or merged."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled, self._plan = value, None

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The adapters every row uses (when no :attr:`routing` is set); names this layer lacks add nothing."""
        return self._active

    @active_adapters.setter
    def active_adapters(self, names: Sequence[str]) -> None:
        self._active, self._plan = tuple(names), None

    @property
    def disabled_adapters(self) -> frozenset[str]:
        """Adapters switched off for now (``adapters_disabled(model, names)``), active or not."""
        return self._disabled

    @disabled_adapters.setter
    def disabled_adapters(self, names: frozenset[str]) -> None:
        self._disabled, self._plan = frozenset(names), None

    @property
    def merged_adapters(self) -> frozenset[str]:
        """Adapters folded into ``weight``."""
        return frozenset(self._merged)

    def merge_adapter(self, name: str) -> None:
        """W += s B A of adapter ``name`` (a no-op when it is merged already)."""
        if name not in self._merged:
            with torch.no_grad():
                self.weight += self.delta_weight(name).to(self.weight.dtype)
            self._merged.add(name)
            self._plan = None

    def unmerge_adapter(self, name: str) -> None:
        """W -= s B A of adapter ``name`` (a no-op when it is not merged)."""
        if name in self._merged:
            with torch.no_grad():
                self.weight -= self.delta_weight(name).to(self.weight.dtype)
            self._merged.discard(name)
            self._plan = None

    def _forget(self, name: str) -> None:
        self._cached.pop(name, None)
        self._plan = None

    def _terms(self, live: Sequence[str]) -> tuple[tuple[str, float], ...]:
        """(adapter, sign) updates a call makes when ``live`` adapters should be in effect."""
        held = self.adapter_names
        on = [n for n in live if n in held and n not in self._disabled]
        back = [(RESIDUAL, 1.0)] if self.residual is not None and self._residual_owner not in on else []
        return tuple([(n, 1.0) for n in on if n not in self._merged]
                     + [(n, -1.0) for n in held if n in self._merged and n not in on] + back)

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and self._enabled:
            return self._forward_per_row(x)
        plan = self._plan
        if plan is None:
            plan = self._plan = self._terms(self._active if self._enabled else ())
        out = F.linear(x, self.weight, self.bias)
        for name, sign in plan:  # usually none (merged or off) or one: the default adapter
            out = self._update(out, x, name, sign)
        return out

    def _update(self, out: torch.Tensor, x: torch.Tensor, name: str, sign: float) -> torch.Tensor:
        """out + sign s B A dropout(x), as one GEMM with accumulate: no separate scale and add over the
        activations. Dropout only when adding (training); taking a merged adapter out uses x itself."""
        f = self.residual if name == RESIDUAL else self if name == DEFAULT_ADAPTER else self.extra_adapters[name]
        h = f.dropout(x) if sign > 0 and self.training else x
        a, bt = self._factors(f, name, sign, x.dtype)
        low = F.linear(h, a).reshape(-1, a.shape[0])
        if torch.is_grad_enabled():
            return torch.addmm(out.reshape(-1, self.out_features), low, bt).view(out.shape)
        out.view(-1, self.out_features).addmm_(low, bt)  # no autograd: accumulate into the fresh output
        return out

    def _forward_per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row r through its own adapter ``routing.names[r]``: the base output for every row, then
        each group of rows sharing an adapter gets that adapter's terms on its own rows only."""
        routing = self.routing
        if x.shape[0] != len(routing.names):
            raise LmadaptError(
                f"adapter_per_row was given {len(routing.names)} adapter name(s) but the model was called with "
                f"a batch of {x.shape[0]} rows; give one name (or None) per row, and generate without beam "
                f"search or num_return_sequences > 1 (they change the batch size)")
        out = F.linear(x, self.weight, self.bias)
        for name in routing.groups:
            terms = self._terms(() if name is None else (name,))
            if not terms:
                continue
            rows = routing.rows(name, x.device)
            part, xs = out.index_select(0, rows), x.index_select(0, rows)
            for adapter, sign in terms:
                part = self._update(part, xs, adapter, sign)
            out = out.index_copy(0, rows, part) if torch.is_grad_enabled() else out.index_copy_(0, rows, part)
        return out

    def _factors(self, f: nn.Module, name: str, sign: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, sign (s B)^T) of adapter ``name`` (held by ``f``) in the dtype the adapter runs in.

        The factors are cast to the activations' dtype (an r x d copy), never the activations to the
        factors' fp32: under autocast that is bf16/fp16; without it, the model's own dtype. Outside
        autograd (generation, evaluation) the cast factors are cached, (s B)^T contiguous, until the
        parameters change: decoding one token is a few microseconds of work per layer, so what the
        adapter costs there is mostly per-call overhead.
        """
        device_type = f.lora_A.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        scale = f.scaling * sign
        if torch.is_grad_enabled():
            return f.lora_A.to(dtype), (f.lora_B * scale).to(dtype).t()
        key = (f.lora_A._version, f.lora_B._version, dtype, scale)
        hit = self._cached.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._cached[name] = (key, f.lora_A.to(dtype), (f.lora_B * scale).to(dtype).t().contiguous())
        return hit[1], hit[2]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.factors(n).lora_A.shape[0]}, scaling={self.factors(n).scaling:g}"
                             for n in self.adapter_names)
        return f"in={self.in_features}, out={self.out_features}, {adapters}"
