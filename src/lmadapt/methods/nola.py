"""NOLA: LoRA whose factors are linear combinations of fixed random bases regenerated from a seed.

"NOLA: Compressing LoRA using Linear Combination of Random Basis" (first titled "NOLA: Networks as Linear
Combination of Low Rank Random Basis"), Koohpayegani et al., arXiv:2310.02556; official code UCDvision/NOLA.

    y = W0 x + b + s * B A dropout(x),   s = alpha / r
    A = A0 + sum_{i=1..k} a_i A_i     (A0, A_i: r x d_in;   form "code", the default)
    A =      sum_{i=1..k} a_i A_i     (form "paper")
    B =      sum_{j=1..l} b_j B_j     (B_j: d_out x r)

``A_i``, ``B_j`` are U(-1, 1) / sqrt(k) (resp. sqrt(l)) and ``A0`` is Kaiming-uniform (bound 1/sqrt(d_in)), all
drawn from the module's seed; only the coefficients ``a`` (k) and ``b`` (l) train, and the adapter file holds
only them and one int64 seed per module. Merge: W = W0 + s B A; unmerge: W0 = W - s B A.

Seeds and streams (never the global RNG, so training randomness is the same with or without NOLA):

- module seed = the first 8 bytes of sha256(f"{config.seed}:{module name}"), big-endian, shifted right by one
  bit (63 bits: it fits the int64 tensor stored in the file, which reloading uses instead of re-deriving it);
- stream seed = the same hash of f"{module seed}:{part}" with part in A0, A, B, init; each stream is a fresh
  CPU ``torch.Generator`` drawn in order, chunk after chunk (so the chunk size does not change the values).

Bases are always drawn on the CPU and copied to the coefficients' device: the same seed gives the same basis
on every device (CUDA's generator gives other numbers). They are not kept: :class:`_Combination` regenerates
them in chunks in forward (to form A and B) and in backward (dL/da_i = <dL/dA, A_i>_F), as the official
``GenerateParams`` does, unless ``cache_basis`` keeps the stacked basis (k r d_in + l d_out r floats per module).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lmadapt.config import option
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, key_mismatch
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    find_modules,
    freeze_all,
    modules_of_type,
    plain_linear,
    replace_module,
)

CHUNK_ELEMENTS = 1 << 22  # basis values drawn at once (16 MB in fp32): bounds the memory of regeneration
PAPER_A_INIT_STD = 1.0  # times 1/sqrt(d_in): a ~ N(0, 1/d_in) gives A entries LoRA's Kaiming variance 1/(3 d_in)
RANDOM_B_INIT_STD = 0.02  # init "random" (tests): b ~ N(0, 0.02^2), as LoRA's init "random" for B


@dataclass
class NolaConfig:
    r: int = option(8, "Rank of the update B A (the bases' inner size).")
    alpha: float = option(2.0, "Scale numerator: the update is multiplied by alpha/r.")
    num_basis_a: int = option(256, "k: random bases (r x d_in) combined into A; each module trains k coefficients.")
    num_basis_b: int = option(256, "l: random bases (d_out x r) combined into B; each module trains l coefficients.")
    dropout: float = option(0.0, "Dropout on the adapter's input (training only).")
    form: Literal["code", "paper"] = option(
        "code", "code: A = A0 + sum a_i A_i with A0 frozen Kaiming-uniform and a = 0 (the official code); paper: "
        "A = sum a_i A_i with a ~ N(0, 1/d_in) (UNCERTAIN: the paper's init is not pinned down).")
    seed: int = option(0, "Seeds every module's bases: module seed = hash of (seed, module name).")
    cache_basis: bool = option(
        False, "Keep each module's stacked bases in memory instead of regenerating them every forward and "
        "backward: faster, but k r d_in + l d_out r floats per module (small models only).")
    init: Literal["default", "random"] = option(
        "default", "default: b = 0 (identity at init); random: b ~ N(0, 0.02^2) (not identity; for tests).")
    target_modules: list[str] = option(
        ["q_proj", "v_proj"],
        "Linear layers to adapt: trailing dotted names ('q_proj', 'self_attn.q_proj'), 're:<regex>' on "
        "the full name, or 'all-linear' (every linear layer but the output head).")
    exclude_modules: list[str] = option([], "Names or 're:' patterns to leave alone among the targets.")

    def check(self) -> list[str]:
        problems = []
        for key in ("r", "num_basis_a", "num_basis_b"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        if not self.target_modules:
            problems.append("target_modules: name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return problems


def _hash63(text: str) -> int:
    """A 63-bit integer from ``text``, the same in every process (Python's ``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def module_seed(seed: int, name: str) -> int:
    """The seed of module ``name`` (its dotted name in the model) under config seed ``seed``."""
    return _hash63(f"{seed}:{name}")


def _generator(seed: int, part: str) -> torch.Generator:
    """A fresh CPU generator for stream ``part`` of module seed ``seed``."""
    return torch.Generator(device="cpu").manual_seed(_hash63(f"{seed}:{part}"))


def basis_chunks(seed: int, part: str, count: int, rows: int, cols: int) -> Iterator[torch.Tensor]:
    """The basis M_1..M_count of stream ``part`` (each rows x cols, U(-1, 1) / sqrt(count)), fp32 on the CPU,
    in consecutive chunks of at most ``CHUNK_ELEMENTS`` values (at least one matrix)."""
    gen = _generator(seed, part)
    step = max(1, CHUNK_ELEMENTS // (rows * cols))
    for start in range(0, count, step):
        n = min(step, count - start)
        yield torch.empty(n, rows, cols).uniform_(-1.0, 1.0, generator=gen).mul_(1.0 / math.sqrt(count))


def random_basis(seed: int, part: str, count: int, rows: int, cols: int) -> torch.Tensor:
    """The whole basis of :func:`basis_chunks`, stacked: (count, rows, cols)."""
    return torch.cat(list(basis_chunks(seed, part, count, rows, cols)))


class _Combination(torch.autograd.Function):
    """sum_i c_i M_i, the basis M regenerated from its seed chunk by chunk in forward and again in backward,
    where dL/dc_i = <dL/dOut, M_i>_F: memory O(chunk) instead of O(count rows cols)."""

    @staticmethod
    def forward(ctx: Any, coef: torch.Tensor, seed: int, part: str, rows: int, cols: int) -> torch.Tensor:
        ctx.basis = (seed, part, coef.numel(), rows, cols)
        out = coef.new_zeros(rows, cols)
        start = 0
        for chunk in basis_chunks(seed, part, coef.numel(), rows, cols):
            n = chunk.shape[0]
            out.add_(torch.tensordot(coef[start:start + n], chunk.to(coef), dims=1))
            start += n
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat = grad.reshape(-1)
        parts = [chunk.to(grad).reshape(chunk.shape[0], -1) @ flat for chunk in basis_chunks(*ctx.basis)]
        return torch.cat(parts), None, None, None, None


def _combine(coef: torch.Tensor, seed: int, part: str, rows: int, cols: int,
             cached: torch.Tensor | None) -> torch.Tensor:
    if cached is not None:
        return torch.tensordot(coef, cached.to(coef.dtype), dims=1)
    return _Combination.apply(coef, seed, part, rows, cols)


class NolaLinear(nn.Module):
    """A linear layer plus s B A with A, B combined from seeded random bases; only ``nola_a``/``nola_b`` train.

    Holds the original ``weight``/``bias`` Parameters under the same names (base state-dict keys unchanged).
    ``nola_A0`` and the optional cached bases are non-persistent buffers: the seed rebuilds them.
    """

    casts_own_parameters = True  # A and B are formed in fp32 and cast to the activations' dtype (see _cast)

    def __init__(self, base: nn.Linear, cfg: NolaConfig, seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scaling, self.form, self.cache_basis = cfg.r, cfg.alpha / cfg.r, cfg.form, cfg.cache_basis
        device = base.weight.device
        self.nola_a = nn.Parameter(torch.zeros(cfg.num_basis_a, device=device))
        self.nola_b = nn.Parameter(torch.zeros(cfg.num_basis_b, device=device))
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.register_buffer("nola_A0", None, persistent=False)
        self.register_buffer("basis_A", None, persistent=False)
        self.register_buffer("basis_B", None, persistent=False)
        self._enabled, self._merged = True, False
        self._cached: tuple | None = None  # inference-time cast factors, see _cast
        self.seed = -1
        self.set_seed(seed)
        self.reset_coefficients(cfg.init)

    def set_seed(self, seed: int) -> None:
        """Use module seed ``seed``: regenerate A0 (form "code") and the cached bases from it."""
        if self._merged:
            raise RuntimeError("unmerge the NOLA adapter before changing its seed (the merged update uses the old one)")
        self.seed, self._cached = seed, None
        device = self.nola_a.device
        if self.form == "code":
            a0 = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(a0, a=math.sqrt(5), generator=_generator(seed, "A0"))  # nn.Linear's / LoRA's A
            self.nola_A0 = a0.to(device)
        if self.cache_basis:
            k, ll = self.nola_a.numel(), self.nola_b.numel()
            self.basis_A = random_basis(seed, "A", k, self.r, self.in_features).to(device)
            self.basis_B = random_basis(seed, "B", ll, self.out_features, self.r).to(device)

    def reset_coefficients(self, init: str) -> None:
        """a = 0 (form "code") or a ~ N(0, 1/d_in) (form "paper"); b = 0, or N(0, 0.02^2) with init "random"."""
        gen = _generator(self.seed, "init")
        with torch.no_grad():
            a = torch.zeros(self.nola_a.shape)
            if self.form == "paper":
                a.normal_(0.0, PAPER_A_INIT_STD / math.sqrt(self.in_features), generator=gen)
            b = torch.zeros(self.nola_b.shape)
            if init == "random":
                b.normal_(0.0, RANDOM_B_INIT_STD, generator=gen)
            self.nola_a.copy_(a)
            self.nola_b.copy_(b)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the coefficients' dtype, differentiable in ``nola_a`` and ``nola_b``; formed outside
        autocast, so that a bf16 run sums the k scaled bases in fp32 and only the result is cast."""
        with torch.autocast(self.nola_a.device.type, enabled=False):
            return self._factors()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = _combine(self.nola_a, self.seed, "A", self.r, self.in_features, self.basis_A)
        if self.nola_A0 is not None:
            a = a + self.nola_A0.to(a.dtype)
        b = _combine(self.nola_b, self.seed, "B", self.out_features, self.r, self.basis_B)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """s B A, in fp32."""
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scaling

    @property
    def adapter_enabled(self) -> bool:
        """False: the layer gives the base model's outputs (merged or not)."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    @property
    def merged(self) -> bool:
        return self._merged

    def merge(self) -> None:
        """W += s B A (a no-op when merged already)."""
        if not self._merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self._merged, self._cached = True, None

    def unmerge(self) -> None:
        """W -= s B A (a no-op when not merged)."""
        if self._merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self._merged, self._cached = False, None

    def as_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's ``weight`` and ``bias`` (a merged update included)."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self._enabled != self._merged:  # on and not merged: add the update; off but merged: take it out
            sign = 1.0 if self._enabled else -1.0
            h = self.dropout(x) if sign > 0 else x
            a, b = self._cast(x.dtype, sign)
            out = out + F.linear(F.linear(h, a), b)
        return out

    def _cast(self, dtype: torch.dtype, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, sign s B) in the dtype the update runs in: the autocast dtype under autocast, else the activations'.

        Outside autograd (generation, evaluation) they are cached until the coefficients change: regenerating
        the bases for every decoded token would cost far more than the token itself.
        """
        device_type = self.nola_a.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        if torch.is_grad_enabled():
            a, b = self.factors()
            return a.to(dtype), (b * (self.scaling * sign)).to(dtype)
        key = (self.nola_a._version, self.nola_b._version, self.nola_a.device, dtype, sign, self.seed)
        if self._cached is None or self._cached[0] != key:
            a, b = self.factors()
            self._cached = (key, a.to(dtype), (b * (self.scaling * sign)).to(dtype))
        return self._cached[1], self._cached[2]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, k={self.nola_a.numel()}, "
                f"l={self.nola_b.numel()}, scaling={self.scaling:g}, form={self.form}, seed={self.seed}")


@register
class Nola(Method):
    """NOLA (Koohpayegani et al., arXiv:2310.02556): y = W0 x + s B A x, A = A0 + sum a_i A_i, B = sum b_j B_j."""

    name = "nola"
    config_class = NolaConfig
    peft_type = None  # PEFT has no NOLA: the lmadapt record identifies the files
    mergeable = True

    def apply(self, model: nn.Module) -> None:
        """Freeze the model and put a :class:`NolaLinear` (seeded from its own name) on each target."""
        cfg = self.config
        freeze_all(model)
        for name, module in find_modules(model, cfg.target_modules, exclude=cfg.exclude_modules):
            replace_module(model, name, NolaLinear(module, cfg, module_seed(cfg.seed, name)))

    def _layers(self, model: nn.Module) -> list[tuple[str, NolaLinear]]:
        return list(modules_of_type(model, NolaLinear))

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        layers = self._layers(model)
        return [ParamGroup("nola", [m.nola_a for _, m in layers] + [m.nola_b for _, m in layers])]

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
        """Per module: the coefficients ``nola_a`` (k), ``nola_b`` (l) and the module seed ``nola_seed`` (int64)."""
        state = {}
        for name, m in self._layers(model):
            state[f"{PEFT_PREFIX}{name}.nola_a"] = m.nola_a.detach()
            state[f"{PEFT_PREFIX}{name}.nola_b"] = m.nola_b.detach()
            state[f"{PEFT_PREFIX}{name}.nola_seed"] = torch.tensor([m.seed], dtype=torch.int64)
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the coefficients and use the stored seeds (not re-derived ones) to regenerate the bases."""
        layers = dict(self._layers(model))
        expected = {f"{PEFT_PREFIX}{n}.nola_{key}" for n in layers for key in ("a", "b", "seed")}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise KeyError(key_mismatch(missing, unexpected))
        for name, m in layers.items():
            seed = state[f"{PEFT_PREFIX}{name}.nola_seed"]
            if seed.dtype != torch.int64 or seed.numel() != 1 or int(seed) < 0:
                raise ValueError(f"{name}.nola_seed: expected one non-negative int64 seed, got {seed.dtype} of "
                                 f"shape {tuple(seed.shape)} (not a NOLA adapter saved by lmadapt?)")
            for key, what in (("a", "num_basis_a"), ("b", "num_basis_b")):
                src, dst = state[f"{PEFT_PREFIX}{name}.nola_{key}"], getattr(m, f"nola_{key}")
                if src.shape != dst.shape:
                    raise ValueError(f"{name}.nola_{key}: saved shape {tuple(src.shape)} != model's "
                                     f"{tuple(dst.shape)} (the adapter was saved with another {what})")
        with torch.no_grad():
            for name, m in layers.items():
                seed = int(state[f"{PEFT_PREFIX}{name}.nola_seed"])
                if seed != m.seed:
                    m.set_seed(seed)
                m.nola_a.copy_(state[f"{PEFT_PREFIX}{name}.nola_a"])
                m.nola_b.copy_(state[f"{PEFT_PREFIX}{name}.nola_b"])
