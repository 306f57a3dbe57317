"""Base-model fingerprints: a short hash of sampled weight bits that ties an adapter to its base."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch


def _sample_bits(t: torch.Tensor, samples: int) -> bytes:
    """The bf16 bit patterns of a strided sample of at most ``samples`` values (from index 0)."""
    flat = t.detach().reshape(-1)
    step = max(1, -(-flat.numel() // samples))  # ceil: the sample spans the whole tensor
    return flat[::step][:samples].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


def fingerprint(model: torch.nn.Module | Mapping[str, torch.Tensor], *,
                exclude: Callable[[str], bool] | None = None, samples: int = 256) -> str:
    """A 16-hex-digit id of the base weights, equal for fp32 and bf16 copies on any device.

    sha256 over the sorted parameter names, shapes and a strided sample of at most ``samples`` values
    per tensor rounded to bf16 (about 70k values for SmolLM2-135M; a few ms). It identifies a base model,
    it is not a checksum: a change to values outside the sample, or below bf16 precision, is not seen.
    ``model`` is a module (its ``named_parameters()``, tied weights counted once) or a name -> tensor
    mapping, read one value at a time in name order (so a mapping that reads each tensor from disk when asked,
    :class:`lmadapt.models.shards.FolderTensors`, holds one at a time); ``exclude(name)`` drops e.g. adapter
    parameters. fp16 copies do not match (fp16 rounds differently).
    """
    tensors = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if exclude is not None and exclude(name):
            continue
        tensor = tensors[name]  # one value at a time: a lazy mapping keeps one tensor in memory
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.numel() and tensor.device.type != "meta":
            digest.update(_sample_bits(tensor, samples))
    return digest.hexdigest()[:16]
