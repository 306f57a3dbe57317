"""Diff vectors: carry a fine-tune from one base version to another without training.

"Efficient Model Development through Fine-tuning Transfer", Lin et al., arXiv:2503.20110. The diff vector of
a release is what fine-tuning changed, ``Delta = theta_tuned - theta_base``; added to a newer base of the same
architecture and tokenizer it gives ``theta' = theta'_base + alpha * Delta`` (the paper's "recycling"; the result
is also a good start for fine-tuning the new base, "recycling-then-finetuning").

- :func:`extract_diff` (``lmadapt diff extract BASE TUNED``) writes Delta for every tensor that changed, in fp32
  (unchanged tensors are counted, not written), optionally compressed per 2-D tensor: low rank by SVD
  (``Delta ~ B A``, ``B = U_r S_r``, ``A = V_r^T``; Eckart-Young: the Frobenius error is the root of the dropped
  squared singular values) or sparse top-k (the largest ``|Delta|`` kept; the error is the root of the dropped
  squares). ``diff.json`` records the base's fingerprint, and every tensor's shape, dtype and encoding.
- :func:`apply_diff` (``lmadapt diff apply DIFF --model NEWBASE``) writes ``NEWBASE + alpha * Delta`` as a plain
  transformers folder, computed in fp32 and cast to the new base's dtype; rows of the embedding and output
  matrices are matched by token, and rows only the new model has stay as they are.

Both read and write one tensor at a time (:mod:`lmadapt.models.shards`), so the memory they need is about
one shard of output plus a few tensors, never two models. Names or shapes that differ are refused, listed by
name, unless ``allow_mismatch`` (then they are skipped and listed in the output's record). See docs/diff.md.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_dir, atomic_write_json
from lmadapt.jsonfile import JsonFileError, read_json_object
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import model_display_name
from lmadapt.models.shards import (
    DEFAULT_SHARD_BYTES,
    TOKENIZER_FILES,
    FolderTensors,
    ShardWriter,
    TensorInfo,
    copy_model_files,
    embedding_names,
    read_tensor,
    tensor_index,
)
from lmadapt.progress import track
from lmadapt.updates.diff_plan import TOKENIZER_DIR, pair_problems, plan_apply

DIFF_JSON = "diff.json"  # the diff folder's metadata
APPLY_JSON = "lmadapt_diff.json"  # the provenance apply_diff writes beside the model
FORMAT = "lmadapt-diff"
ENCODINGS = ("dense", "lowrank", "topk")  # how a changed tensor is stored; "unchanged" and "skipped" store nothing
_PARTS = {"dense": ("",), "lowrank": (".lowrank_B", ".lowrank_A"), "topk": (".topk_indices", ".topk_values")}
_DELTA_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass
class ExtractReport:
    """What :func:`extract_diff` wrote."""

    path: Path
    changed: int  # tensors with a stored Delta
    unchanged: int  # tensors equal in base and tuned (not written)
    encodings: dict[str, int]  # changed tensors per encoding (dense, lowrank, topk)
    stored_bytes: int  # bytes of tensor data written
    dense_bytes: int  # what the changed tensors' Delta would take uncompressed
    skipped: list[str] = field(default_factory=list)  # "name: why", with allow_mismatch


@dataclass
class ApplyReport:
    """What :func:`apply_diff` wrote."""

    path: Path
    relation: Literal["same_version", "transfer"]  # the new base's fingerprint equals the diff's base, or not
    alpha: float
    applied: int  # tensors that received alpha * Delta
    unchanged: int  # tensors copied as the new base has them
    skipped: list[str] = field(default_factory=list)  # "name: why", with allow_mismatch
    vocabulary: dict[str, Any] | None = None  # how embedding rows were matched, when the diff changes them


# ------------------------------------------------------------------------------------------ compression

def low_rank(delta: torch.Tensor, rank: int | None = None,
             energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, kept): the best rank-r approximation ``B A`` of a 2-D ``delta`` (Eckart-Young, by SVD),
    ``B = U_r diag(S_r)``, ``A = V_r^T``; ``r`` is ``rank``, or the smallest rank whose share of the squared
    singular values reaches ``energy``. ``kept`` is that share: the Frobenius error is
    ``sqrt(1 - kept) * ||delta||_F``."""
    if (rank is None) == (energy is None):
        raise ValueError("give one of rank or energy")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    power = s.double() ** 2
    total = float(power.sum())
    if rank is None:
        cumulative = torch.cumsum(power, 0) / (total or 1.0)
        rank = int(torch.searchsorted(cumulative, torch.tensor([float(energy)], dtype=torch.float64))[0]) + 1
    r = max(1, min(int(rank), s.numel()))
    kept = float(power[:r].sum()) / total if total else 1.0
    return u[:, :r] * s[:r], vh[:r].contiguous(), kept


def top_k(delta: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(indices, values, kept): the ``ceil(fraction * numel)`` entries of ``delta`` largest in magnitude, as
    sorted flat indices and their values; ``kept`` is their share of ``||delta||_F^2``, so the Frobenius error
    of keeping only them is ``sqrt(1 - kept) * ||delta||_F``."""
    flat = delta.reshape(-1)
    k = max(1, min(flat.numel(), math.ceil(fraction * flat.numel())))
    indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    values = flat[indices]
    total = float(flat.double().pow(2).sum())
    kept = float(values.double().pow(2).sum()) / total if total else 1.0
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    return indices.to(index_dtype), values, kept


def decode(encoding: str, parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The Delta a stored tensor's ``parts`` stand for, with ``shape``: dense ``[Delta]``, low rank ``[B, A]``
    (``B A``), top-k ``[flat indices, values]`` (zeros elsewhere)."""
    if encoding == "dense":
        return parts[0]
    if encoding == "lowrank":
        return parts[0] @ parts[1]
    if encoding == "topk":
        out = torch.zeros(math.prod(shape), dtype=parts[1].dtype)
        out[parts[0].long()] = parts[1]
        return out.reshape(shape)
    raise ValueError(f"unknown encoding {encoding!r}")


def _encode(name: str, delta: torch.Tensor, rank: int | None, energy: float | None, fraction: float | None,
            row_tensor: bool, compress_embeddings: bool) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(encoding, tensors to store, what diff.json says about it): compressed only when that is smaller."""
    if delta.dim() == 2:
        m, n = delta.shape
        if (rank or energy) and (compress_embeddings or not row_tensor):
            b, a, kept = low_rank(delta, rank, energy)
            r = a.shape[0]
            if r * (m + n) < m * n:
                return "lowrank", {name + ".lowrank_B": b, name + ".lowrank_A": a}, \
                    {"rank": r, "energy_kept": kept, "relative_error": math.sqrt(max(0.0, 1 - kept))}
        if fraction:
            indices, values, kept = top_k(delta, fraction)
            if indices.numel() * (indices.element_size() + values.element_size()) < delta.nbytes:
                return "topk", {name + ".topk_indices": indices, name + ".topk_values": values}, \
                    {"kept": indices.numel(), "energy_kept": kept, "relative_error": math.sqrt(max(0.0, 1 - kept))}
    return "dense", {name: delta}, {}


# ------------------------------------------------------------------------------------------- extract

def extract_diff(base: str | Path, tuned: str | Path, output_dir: str | Path, *, rank: int | None = None,
                 energy: float | None = None, top_k_fraction: float | None = None,
                 compress_embeddings: bool = False, delta_dtype: Literal["fp32", "fp64"] = "fp32",
                 allow_mismatch: bool = False, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None) -> ExtractReport:
    """Write ``Delta = tuned - base`` (arXiv:2503.20110) for every tensor that changed into ``output_dir``.

    ``base`` and ``tuned``: model folders or built-in names with the same tensor names and shapes (those that
    differ are refused, listed by name, unless ``allow_mismatch`` skips them). The difference is computed in
    fp32 (``delta_dtype="fp64"``: in fp64, which makes ``base + Delta`` give an fp32 ``tuned`` back bit for bit).
    Compression of 2-D tensors, each kept only where it is smaller than the dense Delta: ``rank`` or ``energy``
    (low rank by SVD), ``top_k_fraction`` (the share of entries kept, sparse). The embedding and output
    matrices are not rank-compressed unless ``compress_embeddings``: their rows are tokens, and fine-tuning
    moves a few rows (tokens it saw, e.g. chat-template tokens) a lot, which a low rank spreads over all rows.
    The folder also keeps the tuned model's tokenizer, so that ``apply_diff`` can match embedding rows by token.
    """
    problems = _compression_problems(rank, energy, top_k_fraction, delta_dtype)
    if problems:
        raise LmadaptError("; ".join(problems))
    b_idx, t_idx = tensor_index(base), tensor_index(tuned)
    skipped = pair_problems(b_idx, t_idx, f"base {base}", f"tuned {tuned}")
    if skipped and not allow_mismatch:
        raise _mismatch_error(skipped, f"base {base} and tuned {tuned}", "the diff's diff.json")
    embeddings = embedding_names(base)
    row_names = {n for n in embeddings if n is not None}
    work = _DELTA_DTYPES[delta_dtype]
    entries: dict[str, dict[str, Any]] = {n: {"encoding": "skipped", "reason": why} for n, why in skipped.items()}
    dense_bytes = 0
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for name in track([n for n in t_idx if n not in skipped], "diff extract", "tensors", progress):
                old, new = read_tensor(b_idx, name), read_tensor(t_idx, name)
                entry: dict[str, Any] = {"shape": list(new.shape), "dtype": _dtype_name(new.dtype)}
                common = torch.promote_types(old.dtype, new.dtype)
                if torch.equal(old.to(common), new.to(common)):
                    entries[name] = {**entry, "encoding": "unchanged"}
                    continue
                if not (old.is_floating_point() and new.is_floating_point()):
                    raise LmadaptError(f"{name}: a {entry['dtype']} tensor that differs between base {base} and "
                                       f"tuned {tuned}; a difference of integers is not a diff vector")
                delta = new.to(torch.promote_types(work, new.dtype)) - old.to(torch.promote_types(work, old.dtype))
                encoding, tensors, meta = _encode(name, delta, rank, energy, top_k_fraction, name in row_names,
                                                  compress_embeddings)
                for key, value in tensors.items():
                    writer.add(key, value)
                entries[name] = {**entry, "encoding": encoding, **meta}
                dense_bytes += delta.nbytes
        copy_model_files(tuned, tmp / TOKENIZER_DIR, TOKENIZER_FILES)
        info = _diff_record(base, tuned, b_idx, entries, embeddings,
                            {"rank": rank, "energy": energy, "top_k": top_k_fraction,
                             "compress_embeddings": compress_embeddings, "delta_dtype": delta_dtype},
                            {"stored_bytes": writer.total_bytes, "dense_bytes": dense_bytes})
        atomic_write_json(tmp / DIFF_JSON, info)
    counts = info["counts"]
    return ExtractReport(Path(output_dir), counts["changed"], counts["unchanged"],
                         {k: counts[k] for k in ENCODINGS}, writer.total_bytes, dense_bytes,
                         [f"{n}: {why}" for n, why in skipped.items()])


def _compression_problems(rank: int | None, energy: float | None, fraction: float | None,
                          delta_dtype: str) -> list[str]:
    problems = []
    if rank is not None and energy is not None:
        problems.append("rank and energy are two ways to choose the rank of the low-rank Delta. Choose one.")
    if (rank is not None or energy is not None) and fraction is not None:
        problems.append("low rank (rank/energy) and top_k are two compressions. Choose one.")
    if rank is not None and rank < 1:
        problems.append(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        problems.append(f"energy is the share of squared singular values kept, in (0, 1]; got {energy}")
    if fraction is not None and not 0 < fraction <= 1:
        problems.append(f"top_k is the share of each tensor's entries kept, in (0, 1]; got {fraction}")
    if delta_dtype not in _DELTA_DTYPES:
        problems.append(f"delta_dtype must be one of {', '.join(_DELTA_DTYPES)}, got {delta_dtype!r}")
    return problems


def _mismatch_error(problems: Mapping[str, str], between: str, listed_in: str) -> LmadaptError:
    lines = "\n".join(f"  - {name}: {why}" for name, why in problems.items())
    return LmadaptError(f"{len(problems)} tensor(s) do not match between {between}:\n{lines}\n"
                        f"Use models of the same architecture, or pass --allow-mismatch (allow_mismatch=True) to "
                        f"skip these tensors (they are listed in {listed_in})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _diff_record(base: str | Path, tuned: str | Path, b_idx: Mapping[str, TensorInfo],
                 entries: dict[str, dict[str, Any]], embeddings: tuple[str | None, str | None],
                 compression: dict[str, Any],
                 sizes: dict[str, int]) -> dict[str, Any]:
    from lmadapt import __version__

    encodings = [e["encoding"] for e in entries.values()]
    inputs, output = embeddings
    return {
        "format": FORMAT, "format_version": 1, "lmadapt_version": __version__,
        "created": when(),
        "base": {"name": model_display_name(str(base)), "fingerprint": fingerprint(FolderTensors(b_idx))},
        "tuned": {"name": model_display_name(str(tuned))},
        "embeddings": {"input": inputs, "output": output, "tied": output is not None and output not in b_idx},
        "compression": compression,
        "counts": {"tensors": len(entries), "changed": sum(e in ENCODINGS for e in encodings),
                   **{k: encodings.count(k) for k in (*ENCODINGS, "unchanged", "skipped")}, **sizes},
        "tensors": dict(sorted(entries.items())),
    }


def read_diff_info(path: str | Path) -> dict[str, Any]:
    """The ``diff.json`` of a diff folder, checked: :class:`LmadaptError` naming the file and the entry."""
    file = Path(path) / DIFF_JSON
    if not file.is_file():
        raise LmadaptError(f"{path} is not a diff folder: it has no {DIFF_JSON} (make one with lmadapt diff extract)")
    try:
        info = read_json_object(file)
    except JsonFileError as exc:
        raise LmadaptError(f"{exc}; extract the diff again") from None
    if info.get("format") != FORMAT:
        raise LmadaptError(f"{file}: format: expected {FORMAT!r}, got {info.get('format')!r}; extract the diff again")
    tensors = info.get("tensors")
    if not isinstance(tensors, dict):
        raise LmadaptError(f"{file}: tensors: expected an object of tensor entries; extract the diff again")
    for name, entry in tensors.items():
        known = (*ENCODINGS, "unchanged", "skipped")
        if not isinstance(entry, dict) or entry.get("encoding") not in known:
            raise LmadaptError(f"{file}: tensors.{name}.encoding: expected one of {', '.join(known)}; extract the "
                               f"diff again")
        if entry["encoding"] != "skipped" and not isinstance(entry.get("shape"), list):
            raise LmadaptError(f"{file}: tensors.{name}.shape: expected a list of sizes; extract the diff again")
    return info


def read_delta(path: str | Path, name: str, info: Mapping[str, Any] | None = None,
               index: Mapping[str, TensorInfo] | None = None) -> torch.Tensor:
    """Delta of tensor ``name`` in a diff folder, decoded to a dense tensor (zeros for an unchanged one)."""
    info = info if info is not None else read_diff_info(path)
    entry = info["tensors"][name]
    shape = tuple(entry["shape"])
    if entry["encoding"] == "unchanged":
        return torch.zeros(shape)
    index = index if index is not None else tensor_index(path)
    parts = [read_tensor(index, name + suffix) for suffix in _PARTS[entry["encoding"]]]
    return decode(entry["encoding"], parts, shape)


# --------------------------------------------------------------------------------------------- apply

def apply_diff(diff: str | Path, model: str | Path, output_dir: str | Path, *, alpha: float = 1.0,
               allow_mismatch: bool = False, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               progress: bool | None = None) -> ApplyReport:
    """Write ``model + alpha * Delta`` (arXiv:2503.20110, ``theta'_base + c Delta``) as a plain transformers
    folder: the config and tokenizer of ``model``, sharded safetensors, and ``lmadapt_diff.json`` (where it came
    from, whether ``model`` is the diff's own base, ``same_version``, or another, ``transfer``; what was skipped).

    Each tensor is computed in fp32 (fp64 for an fp64 Delta) and cast to ``model``'s dtype. Embedding and output
    rows get Delta for the tokens both vocabularies share (matched by token with the tokenizers, else by
    position); rows only ``model`` has stay as they are. When the diff's models tie the output layer to the
    embeddings and ``model`` does not, the output layer gets the embeddings' Delta. Names or shapes that do not
    match are refused together, each named, unless ``allow_mismatch`` skips them.
    """
    info = read_diff_info(diff)
    d_idx, n_idx = tensor_index(diff), tensor_index(model)
    plan = plan_apply(diff, info, model, n_idx)
    if plan.problems and not allow_mismatch:
        raise _mismatch_error(plan.problems, f"diff {diff} and model {model}", f"the output's {APPLY_JSON}")
    new_fingerprint = fingerprint(FolderTensors(n_idx))
    relation: Literal["same_version", "transfer"] = (
        "same_version" if new_fingerprint == info["base"]["fingerprint"] else "transfer")
    applied = 0
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for name in track(list(n_idx), "diff apply", "tensors", progress):
                tensor = read_tensor(n_idx, name)
                source = plan.sources.get(name)
                if source is not None:
                    delta = read_delta(diff, source, info, d_idx)
                    tensor = _add(tensor, delta, alpha, plan.rows.get(name))
                    applied += 1
                writer.add(name, tensor)
        copy_model_files(model, tmp)
        report = ApplyReport(Path(output_dir), relation, alpha, applied, len(n_idx) - applied,
                             [f"{n}: {why}" for n, why in plan.problems.items()], plan.vocabulary)
        atomic_write_json(tmp / APPLY_JSON, _provenance(diff, info, model, new_fingerprint, report, plan.notes))
    return report


def _provenance(diff: str | Path, info: Mapping[str, Any], model: str | Path, model_fingerprint: str,
                report: ApplyReport, notes: list[str]) -> dict[str, Any]:
    """The ``lmadapt_diff.json`` an applied diff leaves beside the model."""
    from lmadapt import __version__

    return {"kind": "diff_applied", "diff": str(Path(diff).resolve()), "diff_base": info["base"],
            "diff_tuned": info.get("tuned"), "model": model_display_name(str(model)),
            "model_fingerprint": model_fingerprint, "relation": report.relation, "alpha": report.alpha,
            "applied": report.applied, "unchanged": report.unchanged, "skipped": report.skipped,
            "vocabulary": report.vocabulary, "notes": notes, "compression": info.get("compression"),
            "lmadapt_version": __version__, "created": when()}


def _add(tensor: torch.Tensor, delta: torch.Tensor, alpha: float,
         rows: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``tensor + alpha * delta`` computed in at least fp32 and cast back; ``rows`` (new ids, diff ids): only
    those rows of ``tensor`` get the diff's rows."""
    work = torch.promote_types(torch.promote_types(torch.float32, tensor.dtype), delta.dtype)
    out = tensor.to(work)
    if rows is None:
        out = out + alpha * delta.to(work)
    else:
        new_ids, old_ids = rows
        out = out.clone() if out.data_ptr() == tensor.data_ptr() else out
        out[new_ids] += alpha * delta.to(work)[old_ids]
    return out.to(tensor.dtype)


def when() -> str:
    """Now, in UTC, as ISO 8601 to the second (records say when they were made)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
