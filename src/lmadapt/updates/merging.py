"""Merging: several fine-tunes of one base combined into one, without training, tensor by tensor.

Each input is a task vector ``tau_i``: a fine-tuned model minus its base (``theta_i - theta_base``), or, for a
LoRA-family adapter, the update ``Delta W_i`` of each module it adapts (:mod:`lmadapt.updates.merge_adapters`).
The inputs' weights ``w_i`` and one scale ``lambda`` combine them into ``tau``, and ``theta = theta_base +
lambda tau``:

- ``linear`` (weight averaging, mergekit's ``linear``): ``tau = sum_i w_i tau_i / sum_i w_i``.
- ``task_arithmetic`` ("Editing Models with Task Arithmetic", Ilharco et al., arXiv:2212.04089):
  ``tau = sum_i w_i tau_i``.
- ``ties`` ("TIES-Merging: Resolving Interference When Merging Models", Yadav et al., arXiv:2306.01708): trim
  each ``tau_i`` to its ``density`` share of largest magnitudes, elect each entry's sign as the sign of the sum
  of the weighted trimmed values, and take the weighted mean of the entries that agree with it (disjoint mean).
- ``dare`` ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", Yu et
  al., arXiv:2311.03099): drop each entry of each ``tau_i`` with probability ``p`` and multiply the rest by
  ``1 / (1 - p)``, then task arithmetic. The drops come from ``seed``, the tensor's name and the input's place.
- ``dare_ties``: DARE's drop and rescale, then TIES' sign election and disjoint mean.

:func:`merge_models` merges full models (``--tuned``) and :func:`merge_adapters` LoRA-family adapters
(``--adapter``), into a model folder or (adapters) a LoRA adapter re-compressed by SVD. Both read one tensor
per input at a time (:mod:`lmadapt.models.shards`). See docs/merging.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmadapt.errors import LmadaptError
from lmadapt.fsutil import check_output_dir
from lmadapt.models.shards import (
    DEFAULT_SHARD_BYTES,
    model_folder,
    read_tensor,
    tensor_index,
)
from lmadapt.progress import track
from lmadapt.updates.diff_plan import pair_problems
from lmadapt.updates.merge_adapters import (
    LoraInput,
    adapter_chat_record,
    base_folder,
    common_base,
    module_shapes,
    read_lora_input,
    svd_factors,
    write_lora_adapter,
    write_merged_model,
    write_model,
)

Combine = Literal["linear", "task_arithmetic", "ties", "dare", "dare_ties"]
COMBINES: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare", "dare_ties")


# ------------------------------------------------------------------------------------------------ formulas

def _stacked(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the task vectors stacked on a new first axis in fp32 (fp64 if one is fp64), the weights shaped to
    broadcast against it)."""
    if len(taus) != len(weights) or not taus:
        raise ValueError(f"{len(taus)} task vector(s) and {len(weights)} weight(s): give one weight per vector")
    work = torch.float32
    for t in taus:
        work = torch.promote_types(work, t.dtype)
    stacked = torch.stack([t.to(work) for t in taus])
    w = torch.tensor([float(x) for x in weights], dtype=work).view(-1, *([1] * taus[0].dim()))
    return stacked, w


def linear(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted average ``sum_i w_i tau_i / sum_i w_i`` (weight averaging, "model soups"; mergekit's ``linear``
    with ``normalize: true``). The weights must not sum to 0."""
    stacked, w = _stacked(taus, weights)
    total = float(w.sum())
    if abs(total) < 1e-12:
        raise ValueError(f"linear merging divides by the sum of the weights, which is 0 for {list(weights)}; "
                         f"use task_arithmetic to add and subtract task vectors")
    return (stacked * w).sum(0) / total


def task_arithmetic(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i tau_i`` ("Editing Models with Task Arithmetic", Ilharco et al., arXiv:2212.04089, eq. 1
    with one coefficient per task vector; a negative weight subtracts a task)."""
    stacked, w = _stacked(taus, weights)
    return (stacked * w).sum(0)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim step (Yadav et al., arXiv:2306.01708, section 3): ``tau`` with only its ``k = int(density *
    numel)`` entries largest in magnitude kept and the others set to 0 (``density >= 1``: ``tau`` unchanged).
    Per tensor, as PEFT and mergekit do; the paper's code ranks the whole model's task vector at once."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    k = int(density * flat.numel())
    out = torch.zeros_like(flat)
    if k > 0:
        keep = torch.topk(flat.abs(), k, sorted=False).indices
        out[keep] = flat[keep]
    return out.reshape(tau.shape)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election: per entry, ``+1`` where the sum over inputs (axis 0) of the weighted trimmed values is
    ``>= 0``, else ``-1`` (the paper's ``gamma = sgn(sum_i tau_hat_i)``, with PEFT's and mergekit's ``+1`` for a
    zero sum)."""
    return torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect and disjoint merge on already trimmed (or dropped) ``taus``: with ``v_i = w_i tau_i`` and
    ``gamma = sgn(sum_i v_i)``, each entry is ``sum_{i in A} v_i / sum_{i in A} |w_i|`` over the inputs
    ``A = {i : sgn(v_i) = gamma}`` (a zero entry agrees with no sign), and 0 where ``A`` is empty. With equal
    weights this is the paper's mean of the agreeing entries; ``|w_i|`` keeps a negative weight from flipping
    the elected sign (mergekit divides by ``sum w_i``, PEFT by the count ``|A|``)."""
    stacked, w = _stacked(taus, weights)
    weighted = stacked * w
    agree = weighted.sign() == elect_sign(weighted)
    numerator = (weighted * agree).sum(0)
    denominator = (w.abs() * agree).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


def ties(taus: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al., arXiv:2306.01708, Algorithm 1): :func:`trim` each ``tau_i`` to ``density``,
    then :func:`disjoint_mean` (sign election on the weighted sum, mean of the agreeing entries)."""
    return disjoint_mean([trim(t, density) for t in taus], weights)


def drop_and_rescale(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., arXiv:2311.03099, eq. 2): ``m ~ Bernoulli(p)`` per entry, ``tau' = (1 - m) * tau /
    (1 - p)``, so that ``E[tau'] = tau``. ``p = drop_rate`` in [0, 1); the mask comes from ``generator``."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    keep = torch.rand(tau.shape, generator=generator) >= drop_rate
    return torch.where(keep, tau / (1 - drop_rate), torch.zeros_like(tau))


def dare_generator(seed: int, key: str, index: int) -> torch.Generator:
    """The generator of DARE's mask for input ``index`` on tensor (or module) ``key``: a function of the three
    alone, so a merge is the same whatever order the tensors are visited in, on any machine."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(taus: Sequence[torch.Tensor], weights: Sequence[float], drop_rate: float, seed: int,
         key: str = "") -> torch.Tensor:
    """DARE then task arithmetic (Yu et al., arXiv:2311.03099, section 4.1): ``sum_i w_i DARE(tau_i)``."""
    return task_arithmetic([drop_and_rescale(t, drop_rate, dare_generator(seed, key, i)) for i, t in
                            enumerate(taus)], weights)


def dare_ties(taus: Sequence[torch.Tensor], weights: Sequence[float], drop_rate: float, seed: int,
              key: str = "") -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean (Yu et al., arXiv:2311.03099, DARE before TIES-Merging):
    ``disjoint_mean(DARE(tau_i))``; no magnitude trim."""
    return disjoint_mean([drop_and_rescale(t, drop_rate, dare_generator(seed, key, i)) for i, t in
                          enumerate(taus)], weights)


# ------------------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class MergeSpec:
    """How to combine task vectors: the formula, one weight per input, its option, the final scale."""

    combine: str
    weights: tuple[float, ...]
    density: float | None = None  # ties: the share of each task vector's entries kept
    drop_rate: float | None = None  # dare, dare_ties: the probability p of dropping an entry
    seed: int = 0  # dare, dare_ties: the drops' seed
    scale: float = 1.0  # lambda: theta = theta_base + lambda * tau

    def merge(self, taus: Sequence[torch.Tensor], key: str) -> torch.Tensor:
        """``lambda * tau`` for the task vectors of tensor (or module) ``key``, one per input, in order."""
        w = self.weights
        if self.combine == "linear":
            tau = linear(taus, w)
        elif self.combine == "task_arithmetic":
            tau = task_arithmetic(taus, w)
        elif self.combine == "ties":
            tau = ties(taus, w, self.density if self.density is not None else 1.0)
        elif self.combine == "dare":
            tau = dare(taus, w, self.drop_rate or 0.0, self.seed, key)
        elif self.combine == "dare_ties":
            tau = dare_ties(taus, w, self.drop_rate or 0.0, self.seed, key)
        else:
            raise ValueError(f"unknown combine {self.combine!r}; one of {', '.join(COMBINES)}")
        return tau if self.scale == 1 else tau * self.scale

    def record(self) -> dict[str, Any]:
        """The options as the output's record keeps them (those the formula does not read are left out)."""
        out: dict[str, Any] = {"combine": self.combine, "weights": list(self.weights), "scale": self.scale}
        if self.combine == "ties":
            out["density"] = self.density
        if self.combine in ("dare", "dare_ties"):
            out |= {"drop_rate": self.drop_rate, "seed": self.seed}
        return out


def merge_spec(combine: str, n: int, *, weights: Sequence[float] | None = None, density: float | None = None,
               drop_rate: float | None = None, seed: int = 0, scale: float = 1.0,
               names: Mapping[str, str] | None = None) -> MergeSpec:
    """A checked :class:`MergeSpec` for ``n`` inputs (``weights`` None: 1 each). Every problem is reported at
    once, each option named as ``names`` says (the command line passes its flags; default: the keyword)."""
    name = {k: k for k in ("combine", "weights", "density", "drop_rate")} | dict(names or {})
    problems = []
    if combine not in COMBINES:
        problems.append(f"{name['combine']} must be one of {', '.join(COMBINES)}, got {combine!r}")
    w = tuple(float(x) for x in weights) if weights is not None else (1.0,) * n
    if len(w) != n:
        problems.append(f"{name['weights']}: {len(w)} weight(s) for {n} input(s); give one per input, in order")
    elif combine == "linear" and abs(sum(w)) < 1e-12:
        problems.append(f"{name['weights']}: linear divides by the sum of the weights, which is 0; use "
                        f"task_arithmetic to add and subtract task vectors")
    if any(not math.isfinite(x) for x in w) or not math.isfinite(scale):
        problems.append(f"{name['weights']} and the scale must be finite numbers")
    if combine == "ties":
        if density is None:
            problems.append(f"ties needs {name['density']}: the share of each task vector's entries kept (the TIES "
                            f"paper keeps 0.2; 1 keeps all and only elects signs)")
        elif not 0 < density <= 1:
            problems.append(f"{name['density']} is the share of entries kept, in (0, 1]; got {density}")
    elif density is not None:
        problems.append(f"{name['density']} is TIES' trim; {combine} does not read it (dare and dare_ties drop at "
                        f"random: give {name['drop_rate']})")
    if combine in ("dare", "dare_ties"):
        if drop_rate is None:
            problems.append(f"{combine} needs {name['drop_rate']}: the probability of dropping each entry, in "
                            f"[0, 1) (the DARE paper drops 0.9 of a full fine-tune's deltas)")
        elif not 0 <= drop_rate < 1:
            problems.append(f"{name['drop_rate']} is a probability in [0, 1); got {drop_rate}")
    elif drop_rate is not None:
        problems.append(f"{name['drop_rate']} is DARE's; {combine} does not read it")
    if problems:
        raise LmadaptError("; ".join(problems))
    return MergeSpec(combine, w, density, drop_rate, int(seed), float(scale))


@dataclass
class MergeReport:
    """What :func:`merge_models` or :func:`merge_adapters` wrote."""

    path: Path
    kind: Literal["model", "adapter"]
    spec: MergeSpec
    merged: int  # tensors (models) or modules (adapters) that received a merged update
    rank: int | None = None  # the adapter's rank (adapter output)
    relative_errors: dict[str, float] = field(default_factory=dict)  # module -> SVD truncation error (adapter)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ full models

def merge_models(base: str | Path, tuned: Sequence[str | Path], output_dir: str | Path, *, combine: Combine,
                 weights: Sequence[float] | None = None, density: float | None = None,
                 drop_rate: float | None = None, seed: int = 0, scale: float = 1.0, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None) -> MergeReport:
    """Write ``base + scale * merge(tuned_i - base)`` as a plain transformers model folder.

    ``base`` and each of ``tuned``: model folders or built-in names with the same tensor names and shapes (any
    that differ are refused together, each named). Task vectors are computed tensor by tensor (fp64 for fp32
    weights, so that one tuned model with weight 1 comes back bit for bit; fp32 for 16-bit ones) and the result
    is cast to the base's dtype; non-float tensors must be equal in all inputs and are copied. The config
    and tokenizer are the first tuned model's (a chat template it was tuned with carries over);
    ``lmadapt_merge.json`` records the inputs and options. Peak memory: one tensor per input plus one shard.
    """
    if not tuned:
        raise LmadaptError("merge_models needs at least one tuned model (--tuned)")
    check_output_dir(output_dir, overwrite)  # before any work
    spec = merge_spec(combine, len(tuned), weights=weights, density=density, drop_rate=drop_rate, seed=seed,
                      scale=scale)
    b_idx = tensor_index(base)
    t_idx = [tensor_index(t) for t in tuned]
    problems = {f"{t}: {name}": why for t, idx in zip(tuned, t_idx)
                for name, why in pair_problems(b_idx, idx, "the base", "the tuned model").items()}
    if problems:
        shown = "\n".join(f"  - {k}: {v}" for k, v in list(problems.items())[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LmadaptError(f"{len(problems)} tensor(s) do not match between base {base} and the tuned models:\n"
                           f"{shown}{more}\nMerge only fine-tunes of this base (same architecture and vocabulary)")
    merged = 0

    def tensor_for(name: str, b: torch.Tensor) -> torch.Tensor:
        nonlocal merged
        others = [read_tensor(idx, name) for idx in t_idx]
        if not b.is_floating_point():
            changed = [str(t) for t, o in zip(tuned, others) if not torch.equal(o, b)]
            if changed:
                raise LmadaptError(f"{name}: a {b.dtype} tensor that differs between base {base} and tuned "
                                   f"{changed[0]}; integer tensors cannot be merged")
            return b
        work = torch.float64 if b.dtype in (torch.float32, torch.float64) else torch.float32  # exact tuned - base
        taus = [o.to(work) - b.to(work) for o in others]
        if not any(bool(t.any()) for t in taus):
            return b
        merged += 1
        return (b.to(work) + spec.merge(taus, name)).to(b.dtype)

    record = {"kind": "model_merge", "base_model": _display(base), "tuned": [_display(t) for t in tuned],
              **spec.record()}
    write_model(output_dir, model_folder(base), tensor_for, record, overwrite=overwrite,
                max_shard_bytes=max_shard_bytes, progress=progress, files_from=model_folder(tuned[0]))
    return MergeReport(Path(output_dir), "model", spec, merged)


def _display(model: str | Path) -> str:
    from lmadapt.models.loading import model_display_name

    return model_display_name(str(model))


# ------------------------------------------------------------------------------------------------ adapters

def merge_adapters(adapters: Sequence[str | Path], output_dir: str | Path, *, combine: Combine,
                   weights: Sequence[float] | None = None, density: float | None = None,
                   drop_rate: float | None = None, seed: int = 0, scale: float = 1.0, rank: int | None = None,
                   to: Literal["adapter", "model"] = "model", model: str | Path | None = None,
                   overwrite: bool = False, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   progress: bool | None = None) -> MergeReport:
    """Merge LoRA-family adapters (lora, dora, allora; lmadapt's or PEFT's) of one base.

    Each adapter becomes its update per module, ``Delta W_i = s_i B_i A_i`` (``s = alpha/r``, ``alpha/sqrt(r)``
    with rsLoRA, 1 for ALLoRA; ranks may differ), or for DoRA ``m * (W0 + s B A) / ||W0 + s B A||_row - W0``
    (read from the base's weights). A module only some adapters adapt counts as a zero update in the others
    (the record says which). The updates are merged with ``combine`` (see the module docstring), then:

    - ``to="model"``: added to the base weights, written as a plain transformers folder (exact; the tokenizer
      carries the chat template the adapters were trained with);
    - ``to="adapter"``: each module's merged update re-compressed by truncated SVD to ``rank`` (default: the sum
      of the inputs' ranks, exact for linear and task arithmetic of LoRA inputs) and saved as a LoRA adapter
      with ``alpha = r`` (scale 1) that lmadapt and PEFT load; the record lists the inputs, the options and each
      module's relative Frobenius error of the truncation.

    ``model``: the base (default: the one the first adapter records); read only for DoRA inputs and
    ``to="model"``. Adapters trained on different bases are refused (``force`` merges them anyway and records it).
    """
    if not adapters:
        raise LmadaptError("merge_adapters needs at least one adapter (--adapter)")
    if to not in ("adapter", "model"):
        raise LmadaptError(f"to must be 'adapter' or 'model', got {to!r}")
    if rank is not None and (to == "model" or rank < 1):
        raise LmadaptError(f"rank is the merged adapter's rank (to='adapter'), >= 1; got rank={rank} with to={to!r}")
    spec = merge_spec(combine, len(adapters), weights=weights, density=density, drop_rate=drop_rate, seed=seed,
                      scale=scale)
    check_output_dir(output_dir, overwrite)  # before any work
    inputs = [read_lora_input(a) for a in adapters]
    base_name, fingerprint, notes = common_base(inputs, force)
    shapes, owners = module_shapes(inputs)
    partial: dict[tuple[int, ...], list[str]] = {}
    for module, holders in owners.items():
        if len(holders) < len(inputs):
            partial.setdefault(tuple(holders), []).append(module)
    notes += [f"{len(mods)} module(s) only in adapter(s) {', '.join(str(inputs[i].path) for i in holders)} (e.g. "
              f"{mods[0]}); the others count as a zero update there" for holders, mods in partial.items()]
    needs_base = to == "model" or any(i.is_dora for i in inputs)
    folder = base_folder(model, inputs, fingerprint, force) if needs_base else None
    index = tensor_index(folder) if folder is not None else None

    def update(module: str, w0: torch.Tensor | None) -> torch.Tensor:
        taus = [i.delta(module, w0) if module in i.factors else torch.zeros(shapes[module]) for i in inputs]
        return spec.merge(taus, module)

    inputs_record = [i.record(w) for i, w in zip(inputs, spec.weights)]
    merge_record = {**spec.record(), "inputs": inputs_record, "notes": notes, "forced": force}
    chat = adapter_chat_record(inputs, notes)
    if to == "model":
        assert folder is not None
        merged = write_merged_model(output_dir, folder, update, set(shapes), merge_record, base_name, chat,
                                    overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)
        return MergeReport(Path(output_dir), "model", spec, merged, notes=notes)
    r = rank if rank is not None else sum(i.rank for i in inputs)
    factors, errors = {}, {}
    for module in track(sorted(shapes), "merge adapters", "modules", progress):
        w0 = read_tensor(index, f"{module}.weight") if index is not None and _dora_module(inputs, module) else None
        factors[module], errors[module] = svd_factors(update(module, w0), r)
    merge_record["modules"] = {m: {"inputs": owners[m], "relative_error": errors[m]} for m in sorted(errors)}
    write_lora_adapter(output_dir, factors, r, base_model=base_name, base_fingerprint=fingerprint,
                       extra={"merge": merge_record, **chat}, overwrite=overwrite)
    return MergeReport(Path(output_dir), "adapter", spec, len(factors), r, errors, notes)


def _dora_module(inputs: Sequence[LoraInput], module: str) -> bool:
    return any(i.is_dora and module in i.factors for i in inputs)
