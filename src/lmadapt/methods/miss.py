"""MiSS (Matrix Shard Sharing), the successor of Bone, as in PEFT 0.21 (``peft.tuners.miss``).

"Bone: Block-Affine Adaptation of Large Language Models" / "MiSS: Balancing LoRA Performance and
Efficiency with Simple Shard Sharing", Kang and Yin, arXiv:2409.15371.

One trainable ``miss_block`` per adapted linear layer (W0: d_out x d_in), zero at init, in one of three modes:

- ``default`` (PEFT ``init_weights=True``): D is r x d_out. Pad x with zeros to a multiple of r, sum its
  r-wide chunks into s (r values) and add s D::

      y = W0 x + b + sum_k dropout(x)[k r : (k+1) r] @ D,   i.e.  Delta W[o, j] = D[j mod r, o]

- ``mini`` (``init_weights="mini"``): D is r x mini_r, tiled d_out / mini_r times along the output axis.
- ``bat`` (``init_weights="bat"``, Bone's block affine): B is (d_out/r) x r x r; every r x r block W_{j,i}
  of W0 (row-block j, column-block i) becomes ``W_{j,i} (I + B_j) + B_j``. The forward builds that weight.

Merge folds the update into W0 exactly; unmerge subtracts it (``bat``: ``(W' - B_j) (I + B_j)^-1`` in fp32).
The saved adapter uses PEFT's layout (``base_model.model.<module>.miss_block``), so PEFT and lmadapt load
each other's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, load_tensors, peft_targets
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    plain_linear,
    replace_module,
)

_PEFT_INIT = {"default": True, "mini": "mini", "bat": "bat"}  # mode -> PEFT's init_weights


@dataclass
class MissConfig:
    r: int = option(64, "Shard width: the input is cut into r-wide chunks (bat: the r x r block size).")
    dropout: float = option(0.0, "Dropout on the input of the shard sum (training only; not in bat mode).")
    mode: Literal["default", "mini", "bat"] = option(
        "default", "default: D is r x d_out (PEFT init_weights=true); mini: D is r x mini_r, tiled along d_out "
                   "(init_weights='mini'); bat: Bone's block affine W_ji (I + B_j) + B_j (init_weights='bat').")
    mini_r: int = option(1, "mini mode: D's width; must divide every adapted layer's out_features.")
    init: Literal["zero", "random"] = option(
        "zero", "zero: miss_block = 0 (PEFT's default; the model is unchanged at init); random: Kaiming-uniform "
                "(a = sqrt 5) like PEFT's init_weights=false (not identity at init; for tests).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj', 'self_attn.q_proj'), 're:<regex>' on "
        "the full name, or 'all-linear' (every linear layer but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: must be >= 1, got {self.r}")
        if self.mini_r < 1:
            problems.append(f"mini_r: must be >= 1, got {self.mini_r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.mode == "bat" and self.dropout > 0:
            problems.append("dropout: mode 'bat' builds the adapted weight and has no dropout (as in PEFT); "
                            "set dropout: 0 or use mode default/mini")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems


def _chunk_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """x (..., d_in) zero-padded on the right to a multiple of r, its r-wide chunks summed: (..., r)."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(-2)


def _bat(w: torch.Tensor, b: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Each r x r block W_ji of ``w`` (d_out x d_in) -> W_ji + (W_ji B_j + B_j), or back with ``inverse``:
    (W_ji - B_j) (I + B_j)^-1. ``b`` is (d_out/r, r, r); all in ``w``'s dtype (fp32 for exactness)."""
    d_out, d_in = w.shape
    r = b.shape[-1]
    blocks = w.reshape(d_out // r, r, d_in // r, r).transpose(1, 2)  # [j, i] = W_ji
    bj = b.unsqueeze(1)  # the same B_j for every column block i
    if inverse:
        eye = torch.eye(r, dtype=b.dtype, device=b.device)
        out = (blocks - bj) @ torch.linalg.inv(eye + b).unsqueeze(1)
    else:
        out = blocks + (blocks @ bj + bj)  # PEFT's order: W + delta, delta = W B + B
    return out.transpose(1, 2).reshape(d_out, d_in)


class MissLinear(nn.Module):
    """A linear layer plus one MiSS update (see the module docstring for the three modes).

    Holds the original ``weight``/``bias`` Parameters under the same names, so the base model's
    state-dict keys do not change. ``miss_block`` is kept in fp32 and cast to the activations' dtype
    (or the autocast dtype) per call, so bf16 works with and without autocast.
    """

    casts_own_parameters = True

    def __init__(self, base: nn.Linear, cfg: MissConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.mode, self.r, self.mini_r = cfg.mode, cfg.r, cfg.mini_r
        shape = {"default": (cfg.r, self.out_features), "mini": (cfg.r, cfg.mini_r),
                 "bat": (self.out_features // cfg.r, cfg.r, cfg.r)}[cfg.mode]
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=base.weight.device))
        if cfg.init == "random":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._enabled = True
        self._merged = False

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs, merged or not."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    def shard_matrix(self) -> torch.Tensor:
        """D as an r x d_out matrix (mini: tiled d_out / mini_r times); default and mini modes only."""
        if self.mode == "mini":
            return self.miss_block.repeat(1, self.out_features // self.mini_r)
        return self.miss_block

    def delta_weight(self) -> torch.Tensor:
        """Delta W (d_out x d_in, fp32) with Delta W[o, j] = D[j mod r, o]; default and mini modes only
        (bat's update depends on W0: see :meth:`adapted_weight`)."""
        if self.mode == "bat":
            raise LmadaptError("mode 'bat' has no additive delta weight; use adapted_weight()")
        n = -(-self.in_features // self.r)
        return self.shard_matrix().float().t().repeat(1, n)[:, : self.in_features]

    def adapted_weight(self, weight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``weight`` with the update folded in (or, with ``inverse``, taken out), computed in fp32."""
        w = weight.float()
        if self.mode == "bat":
            return _bat(w, self.miss_block.float(), inverse)
        return w - self.delta_weight() if inverse else w + self.delta_weight()

    def merge(self) -> None:
        """W <- W0 + Delta W (bat: W0 (I + B_j) + B_j per block); a no-op when merged already."""
        if not self._merged:
            with torch.no_grad():
                self.weight.copy_(self.adapted_weight(self.weight))
            self._merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (a no-op when not merged)."""
        if self._merged:
            with torch.no_grad():
                self.weight.copy_(self.adapted_weight(self.weight, inverse=True))
            self._merged = False

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (a merged update included)."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._enabled == self._merged:  # the stored weight is already the one this call wants
            return F.linear(x, self.weight, self.bias)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if self.mode == "bat":
            # built in fp32: in bf16 the small update W_ji B_j + B_j would be rounded away against W_ji
            return F.linear(x, self.adapted_weight(self.weight, inverse=self._merged).to(dtype), self.bias)
        out = F.linear(x, self.weight, self.bias)
        # adding (training): dropout on the shard input; taking a merged update out: the input itself
        s = _chunk_sum(x if self._merged else self.dropout(x), self.r)
        d = self.shard_matrix().to(dtype)
        if self._merged:
            d = -d
        return torch.addmm(out.reshape(-1, self.out_features), s.reshape(-1, self.r), d).view(out.shape)

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.mode == "mini" else ""
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, r={self.r}{mini}"


def _nearest_divisors(n: int, want: int) -> str:
    """The divisors of ``n`` nearest to ``want`` from below and above, e.g. '4 or 8'."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max(d for d in divisors if d <= want)
    above = min((d for d in divisors if d >= want), default=below)
    return str(below) if below == above else f"{below} or {above}"


def _shape_problem(d_in: int, d_out: int, cfg: MissConfig) -> tuple[str, int] | None:
    """(what is wrong with a layer of this shape, the number the fix must divide or bound) or None."""
    if cfg.r > d_in:
        return f"r={cfg.r} is larger than in_features {d_in}; choose r <= {d_in}", d_in
    if cfg.mode == "bat" and (d_in % cfg.r or d_out % cfg.r):
        g = math.gcd(d_in, d_out)
        return (f"mode 'bat' needs r to divide in_features {d_in} and out_features {d_out}, which r={cfg.r} "
                f"does not; r={_nearest_divisors(g, cfg.r)} would work (any divisor of {g})"), g
    if cfg.mode == "mini" and d_out % cfg.mini_r:
        return (f"mode 'mini' needs mini_r to divide out_features {d_out}, which mini_r={cfg.mini_r} does not; "
                f"mini_r={_nearest_divisors(d_out, cfg.mini_r)} would work (any divisor of {d_out})"), d_out
    return None


def _check_shapes(targets: list[tuple[str, nn.Module]], cfg: MissConfig) -> None:
    """Raise one error naming every layer whose shape the mode cannot use, and a value that fits them all."""
    by_problem: dict[str, list[str]] = {}
    bounds = []
    for name, m in targets:
        found = _shape_problem(m.in_features, m.out_features, cfg)
        if found:
            by_problem.setdefault(found[0], []).append(name)
            bounds.append(found[1])
    if not by_problem:
        return
    lines = [f"{names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}: {problem}"
             for problem, names in by_problem.items()]
    key = "mini_r" if cfg.mode == "mini" else "r"
    want = cfg.mini_r if cfg.mode == "mini" else cfg.r
    if cfg.r > min(m.in_features for _, m in targets):
        fix = f"choose r <= {min(m.in_features for _, m in targets)}"
    else:
        g = math.gcd(*bounds)
        fix = f"{key}={_nearest_divisors(g, want)} works for all of them (any divisor of {g})"
    raise LmadaptError(f"MiSS cannot adapt {sum(map(len, by_problem.values()))} module(s) with mode "
                       f"'{cfg.mode}': " + "; ".join(lines) + f". {fix}, or exclude those modules "
                       f"(exclude_modules).")


@register
class Miss(Method):
    """MiSS / Bone (Kang and Yin, arXiv:2409.15371): y = W0 x + b + (sum of r-chunks of x) @ D; bat mode:
    blocks W_ji (I + B_j) + B_j."""

    name = "miss"
    config_class = MissConfig
    peft_type = "MISS"
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        freeze_all(model)
        targets = find_modules(model, cfg.target_modules, types=(nn.Linear,), exclude=cfg.exclude_modules)
        _check_shapes(targets, cfg)
        self.module_names = [n for n, _ in targets]
        for n, module in targets:
            replace_module(model, n, MissLinear(module, cfg))

    def _layers(self, model: nn.Module) -> list[tuple[str, MissLinear]]:
        return list(modules_of_type(model, MissLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("miss", [m.miss_block for _, m in self._layers(model)])]

    def merge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self._layers(model):
            m.unmerge()

    def unload(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back (a merged update stays in the weights)."""
        for name, m in self._layers(model):
            replace_module(model, name, m.as_linear())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{n}.miss_block": m.miss_block.detach() for n, m in self._layers(model)}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors({f"{PEFT_PREFIX}{n}.miss_block": m.miss_block for n, m in self._layers(model)}, state,
                     "different base model, r, mode or mini_r?")

    def adapter_config(self) -> dict[str, Any]:
        cfg = self.config
        init = False if cfg.mode == "default" and cfg.init == "random" else _PEFT_INIT[cfg.mode]
        return {
            "peft_type": "MISS",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "miss_dropout": cfg.dropout,
            "mini_r": cfg.mini_r,
            "init_weights": init,
            "target_modules": peft_targets(cfg.target_modules, getattr(self, "module_names", None),
                                           cfg.exclude_modules),
            "exclude_modules": None,  # folded into target_modules by peft_targets
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        unsupported = {
            "layers_to_transform": peft.get("layers_to_transform") is not None,
            "bias": peft.get("bias", "none") != "none",
            "modules_to_save": bool(peft.get("modules_to_save")),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"this PEFT MiSS adapter uses {', '.join(bad)}, which lmadapt's miss does not "
                             f"support; merge it with PEFT and load the merged model instead")
        init = peft.get("init_weights", True)
        if init not in (True, False, "mini", "bat"):
            raise ValueError(f"init_weights {init!r} is not one of PEFT's MiSS modes (true, false, 'mini', 'bat')")
        targets = peft.get("target_modules")
        if not targets:
            raise ValueError("target_modules is empty; name the adapted modules in adapter_config.json")
        if isinstance(targets, str):
            targets = [targets] if targets == "all-linear" else [f"re:{targets}"]
        exclude = peft.get("exclude_modules") or []
        if isinstance(exclude, str):
            exclude = [f"re:{exclude}"]
        mode = init if init in ("mini", "bat") else "default"
        # PEFT's bat forward applies no dropout, so its miss_dropout is inert there
        dropout = 0.0 if mode == "bat" else float(peft.get("miss_dropout", 0.0))
        return {"r": int(peft.get("r", 64)), "dropout": dropout, "mode": mode, "mini_r": int(peft.get("mini_r", 1)),
                "init": "random" if init is False else "zero", "target_modules": sorted(targets),
                "exclude_modules": list(exclude)}
