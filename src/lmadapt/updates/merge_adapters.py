"""LoRA-family adapters as per-module weight updates, and merged updates written back out, for
:mod:`lmadapt.updates.merging`.

An adapter of the LoRA family is read into its factors and scale (:func:`read_lora_input`); its update of a
module is ``Delta W = s B A`` ("LoRA", Hu et al., arXiv:2106.09685; ``s = alpha / r``, ``alpha / sqrt(r)`` with
rsLoRA, arXiv:2312.03732; 1 for ALLoRA), or for DoRA ("DoRA", Liu et al., arXiv:2402.09353) the change its
merged weight makes, ``m * (W0 + s B A) / ||W0 + s B A||_row - W0`` (the norm of each output row, as
:class:`lmadapt.methods.dora.DoraLinear` merges). A merged update is written as a LoRA adapter after a truncated
SVD (:func:`svd_factors`, :func:`write_lora_adapter`) or added to the base's weights (:func:`write_model`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterInfo,
    read_adapter_info,
    read_adapter_tensors,
    save_adapter,
)
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.fsutil import atomic_dir
from lmadapt.methods import build_method, method_class
from lmadapt.methods.dora import MAGNITUDE_KEY
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.shards import (
    DEFAULT_SHARD_BYTES,
    FolderTensors,
    ShardWriter,
    copy_model_files,
    model_folder,
    read_tensor,
    tensor_index,
)
from lmadapt.progress import track
from lmadapt.updates.diff import low_rank, when

LORA_FAMILY = ("lora", "dora", "allora")  # methods whose update of a module is s B A (DoRA: with m)
RECORD_FILE = "lmadapt_merge.json"  # the provenance a merged model folder carries (as lmadapt.api.merge's)
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", f".{MAGNITUDE_KEY}": "m", f".{MAGNITUDE_KEY}.weight": "m"}


@dataclass
class LoraInput:
    """One LoRA-family adapter, read: its factors per module (fp32) and its scale."""

    path: Path
    info: AdapterInfo
    scaling: float  # s: alpha / r, alpha / sqrt(r) with rsLoRA, 1 for ALLoRA
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: r x d_in, B: d_out x r)
    magnitudes: dict[str, torch.Tensor]  # module -> m (d_out), DoRA only

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)

    def delta(self, module: str, w0: torch.Tensor | None = None) -> torch.Tensor:
        """``Delta W`` of ``module`` in fp32: ``s B A``; for DoRA ``m * (W0 + s B A) / ||W0 + s B A||_row - W0``,
        which needs the base weight ``w0``."""
        a, b = self.factors[module]
        update = self.scaling * (b @ a)
        if not self.is_dora:
            return update
        if w0 is None:
            raise ValueError(f"{module}: a DoRA update needs the base weight W0")
        if tuple(w0.shape) != tuple(update.shape):
            raise AdapterError(f"{self.path}: {module}: the adapter's update is {list(update.shape)}, the base weight "
                               f"{list(w0.shape)}; give the base model it was trained on with --model")
        w0 = w0.float()
        adapted = w0 + update
        norm = torch.linalg.vector_norm(adapted, dim=1)
        return (self.magnitudes[module] / norm).unsqueeze(1) * adapted - w0

    def record(self, weight: float) -> dict[str, Any]:
        """What the merged output's record says about this input."""
        return {"path": str(self.path.resolve()), "method": self.info.method["name"], "r": self.rank,
                "scaling": self.scaling, "rslora": bool(self.info.method.get("rslora", False)), "weight": weight,
                "base_model": self.info.base_model, "base_fingerprint": self.info.base_fingerprint,
                "source": self.info.source}


def read_lora_input(path: str | Path) -> LoraInput:
    """Read a LoRA-family adapter folder (lmadapt's or PEFT's). Other methods, adapters with objective heads and
    files whose tensors do not fit their config are refused, naming the folder and what to do."""
    info = read_adapter_info(path)
    name = info.method["name"]
    if name not in LORA_FAMILY:
        mergeable = method_class(name).mergeable
        todo = (f"fold it into its base alone (lmadapt merge --adapter {path} --output M) and merge full models "
                f"with --tuned M --model BASE" if mergeable else "it changes more than the weights, so it cannot "
                "be merged into a model at all")
        raise AdapterError(f"{path}: a {name!r} adapter; merging combines the updates of LoRA-family adapters "
                           f"({', '.join(LORA_FAMILY)}) only: {todo}")
    if info.objective is not None:
        raise AdapterError(f"{path}: carries the heads of objective {info.objective.get('name')!r}, which merging "
                           f"cannot combine; merge adapters trained without heads")
    try:
        cfg = build_method(info.method).config
    except (LmadaptError, TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{info.path / CONFIG_NAME}: {exc}") from None
    scaling = cfg.lora().scaling if hasattr(cfg, "lora") else cfg.scaling  # ALLoRA's layer is a LoRA of scale 1
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_tensors(info.path).items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{info.path / WEIGHTS_NAME}: tensor {key!r} is not a LoRA factor "
                               f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight); save the adapter again")
        parts.setdefault(key.removeprefix(PEFT_PREFIX).removesuffix(suffix), {})[_SUFFIXES[suffix]] = tensor.float()
    want = "ABm" if name == "dora" else "AB"
    factors, magnitudes = {}, {}
    for module, got in sorted(parts.items()):
        missing = [p for p in want if p not in got]
        a, b = got.get("A"), got.get("B")
        if missing or a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.r \
                or b.shape[1] != cfg.r:
            raise AdapterError(f"{info.path / WEIGHTS_NAME}: module {module}: expected lora_A (r x d_in) and lora_B "
                               f"(d_out x r) with r = {cfg.r}{' and the magnitude vector' if name == 'dora' else ''}; "
                               f"got {sorted(got)} with shapes {[list(t.shape) for t in got.values()]}")
        factors[module] = (a, b)
        if name == "dora":
            magnitudes[module] = got["m"].reshape(-1)
    if not factors:
        raise AdapterError(f"{info.path / WEIGHTS_NAME} holds no LoRA factors")
    return LoraInput(info.path, info, float(scaling), int(cfg.r), factors, magnitudes)


def common_base(inputs: Sequence[LoraInput], force: bool) -> tuple[str | None, str | None, list[str]]:
    """(base model name, base fingerprint, notes) the adapters share. Adapters that record different bases (by
    fingerprint; by name when none records one) are refused unless ``force``, which is noted."""
    notes: list[str] = []
    printed = [i for i in inputs if i.info.base_fingerprint]
    named = [i for i in inputs if i.info.base_model]
    clash: tuple[LoraInput, LoraInput] | None = None
    if printed:
        clash = next(((printed[0], i) for i in printed if i.info.base_fingerprint != printed[0].info.base_fingerprint),
                     None)
        notes += [f"{i.path}: records no base fingerprint (a PEFT adapter); its base was not checked"
                  for i in inputs if not i.info.base_fingerprint]
    elif named:
        clash = next(((named[0], i) for i in named if i.info.base_model != named[0].info.base_model), None)
    if clash is not None:
        first, other = clash
        what = f"{_base(first.info)} and {_base(other.info)}"
        if not force:
            raise AdapterError(f"adapters {first.path} and {other.path} were trained on different base models ({what}); "
                               f"a merge adds their updates to one base, so they must share it. Merge adapters of "
                               f"one base (carry one over first with lmadapt port), or pass --force (force=True) to "
                               f"merge them anyway")
        notes.append(f"forced: the adapters were trained on different bases ({what})")
    source = printed[0] if printed else (named[0] if named else inputs[0])
    return source.info.base_model, source.info.base_fingerprint if printed else None, notes


def _base(info: AdapterInfo) -> str:
    return f"{info.base_model!r}" + (f" (fingerprint {info.base_fingerprint})" if info.base_fingerprint else "")


def module_shapes(inputs: Sequence[LoraInput]) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """(module -> (d_out, d_in) of its update, module -> the indices of the inputs that adapt it)."""
    shapes: dict[str, tuple[int, int]] = {}
    owners: dict[str, list[int]] = {}
    for n, inp in enumerate(inputs):
        for module, (a, b) in inp.factors.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(module, shape) != shape:
                first = inputs[owners[module][0]].path
                raise AdapterError(f"module {module} has a {list(shapes[module])} update in {first} but {list(shape)} "
                                   f"in {inp.path}: these adapters were not trained on the same base model")
            owners.setdefault(module, []).append(n)
    return dict(sorted(shapes.items())), dict(sorted(owners.items()))


def base_folder(model: str | Path | None, inputs: Sequence[LoraInput], fingerprint: str | None,
                force: bool) -> Path:
    """The base model's folder: ``model``, else the one the first adapter records; checked against the adapters'
    fingerprint unless ``force``."""
    from lmadapt.api import base_model
    from lmadapt.models.fingerprint import fingerprint as fingerprint_of

    chosen = base_model(str(model) if model is not None else None, next(
        (i.info for i in inputs if i.info.base_model), inputs[0].info))
    folder = model_folder(str(chosen))
    if fingerprint and not force:
        actual = fingerprint_of(FolderTensors(folder))
        if actual != fingerprint:
            raise AdapterError(f"base model {folder} has fingerprint {actual}, but the adapters were trained on "
                               f"{inputs[0].info.base_model!r} (fingerprint {fingerprint}); give that model with "
                               f"--model (model=...), or pass --force (force=True) to merge onto this one anyway")
    return folder


def adapter_chat_record(inputs: Sequence[LoraInput], notes: list[str]) -> dict[str, Any]:
    """``chat_template`` and ``system_prompt`` the merged output keeps: the first adapter's (a note says so
    when the adapters were trained with different ones)."""
    first = inputs[0].info
    for i in inputs[1:]:
        if (i.info.chat_template, i.info.system_prompt) != (first.chat_template, first.system_prompt):
            notes.append(f"the adapters were trained with different chat templates or system prompts; the merged "
                         f"one keeps {inputs[0].path}'s")
            break
    return {"chat_template": first.chat_template, "system_prompt": first.system_prompt}


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """((A, B), relative error): the best rank-``rank`` approximation ``B A`` of ``delta`` by truncated SVD
    (Eckart-Young), ``B = U_r S_r``, ``A = V_r^T``, padded with zero rows/columns to ``rank`` where ``delta`` is
    smaller; the error is ``||delta - B A||_F / ||delta||_F = sqrt(sum of the dropped s_j^2 / sum of all)``."""
    b, a, kept = low_rank(delta.float(), rank)
    pad = rank - a.shape[0]
    if pad > 0:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return (a.contiguous(), b.contiguous()), math.sqrt(max(0.0, 1.0 - kept))


def write_lora_adapter(output_dir: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, *,
                       base_model: str | None, base_fingerprint: str | None, extra: dict[str, Any],
                       overwrite: bool = False) -> Path:
    """Save ``factors`` (module -> (A, B)) as a plain LoRA adapter of rank ``rank`` with ``alpha = rank`` (scale 1,
    no rsLoRA) on exactly these modules, in lmadapt's format (which PEFT loads)."""
    names = sorted(factors)
    method = build_method({"name": "lora", "r": rank, "alpha": float(rank), "dropout": 0.0, "rslora": False,
                           "target_modules": ["re:^(" + "|".join(re.escape(n) for n in names) + ")$"]})
    method.module_names = names  # type: ignore[attr-defined]  # PEFT's target_modules: these names exactly
    state = {f"{PEFT_PREFIX}{n}.lora_{part}.weight": t for n in names for part, t in zip("AB", factors[n])}
    return save_adapter(None, method, output_dir, base_model=base_model, base_fingerprint=base_fingerprint,
                        overwrite=overwrite, extra=extra, state=state)


def write_model(output_dir: str | Path, folder: Path, tensor_for: Callable[[str, torch.Tensor], torch.Tensor],
                record: dict[str, Any], *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                progress: bool | None = None, files_from: Path | None = None,
                chat_template: dict[str, str] | None = None) -> Path:
    """Write a model folder: every tensor of the model in ``folder`` as ``tensor_for(name, tensor)`` returns it,
    one at a time, in shards; the config and tokenizer files of ``files_from`` (default ``folder``), the
    tokenizer with ``chat_template`` when given; and ``record`` as ``lmadapt_merge.json``."""
    from lmadapt import __version__
    from lmadapt.models.loading import load_tokenizer

    index = tensor_index(folder)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for name in track(list(index), "merge", "tensors", progress):
                writer.add(name, tensor_for(name, read_tensor(index, name)))
        copy_model_files(files_from or folder, tmp)
        if chat_template is not None:
            tokenizer = load_tokenizer(tmp)
            tokenizer.chat_template = chat_template["template"]
            tokenizer.save_pretrained(str(tmp))
        full = {**record, "lmadapt_version": __version__, "created": when()}
        (tmp / RECORD_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)


def write_merged_model(output_dir: str | Path, folder: Path, update: Callable[[str, torch.Tensor], torch.Tensor],
                       modules: set[str], merge_record: dict[str, Any], base_name: str | None,
                       chat: dict[str, Any], **write: Any) -> int:
    """Write the base model in ``folder`` into ``output_dir`` (:func:`write_model`) with ``update(module, W0)``, the
    merged update of each of ``modules``, added to its weight in fp32 and cast back; returns how many weights
    changed. ``merge_record`` and the chat settings go into ``lmadapt_merge.json``."""
    index = tensor_index(folder)
    missing = sorted(m for m in modules if f"{m}.weight" not in index)
    if missing:
        raise LmadaptError(f"{folder} has no weight for {len(missing)} adapted module(s) (first: {missing[0]}.weight); "
                           f"give the base model the adapters were trained on with --model (model=...)")
    merged = 0

    def tensor_for(name: str, w: torch.Tensor) -> torch.Tensor:
        nonlocal merged
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in modules:
            return w
        merged += 1
        work = torch.promote_types(torch.float32, w.dtype)
        delta = update(module, w.to(work))
        if delta.shape != w.shape:
            raise LmadaptError(f"{name}: the adapters' update has shape {list(delta.shape)}, the base's weight "
                               f"{list(w.shape)}; give the base model the adapters were trained on with --model")
        return (w.to(work) + delta).to(w.dtype)

    record = {"kind": "adapter_merge", "base_model": base_name or str(folder), **merge_record,
              "chat_template": (chat.get("chat_template") or {}).get("name"),
              "system_prompt": chat.get("system_prompt")}
    write_model(output_dir, folder, tensor_for, record, chat_template=chat.get("chat_template"), **write)
    return merged
