"""Several processes, one run: data parallelism under ``torchrun`` (gloo on CPU, NCCL on CUDA).

Each process (rank) holds the whole model and reads its share of every global micro-batch: the batch plan is
the same function of seed and epoch on every rank, with ``batch_size * world_size`` rows per micro-batch, and
rank r takes rows r, r + world_size, ... of each. After the backward passes of a step the gradients are
summed over the ranks (one flattened all-reduce per dtype), and the loss is divided by the *global* count of
loss-bearing units (also summed over the ranks), so every target token weighs the same as in one process
with the same global batch. Every rank then takes the same optimizer step. Only rank 0 logs, draws
progress and writes checkpoints and adapters; the others wait at a barrier.

Launch: ``torchrun --nproc-per-node 2 -m lmadapt train config.yaml`` (docs/distributed.md). Without torchrun
(no ``WORLD_SIZE`` in the environment) everything here is a no-op for a single process.

That is ``train.distributed: ddp``. With ``fsdp`` the same data plan and loss scale hold, but parameters,
gradients and optimizer state are sharded (:mod:`lmadapt.training.fsdp`): the gradients are summed by FSDP's
reduce-scatter instead of :meth:`Distributed.sum_gradients`, and saving reads whole tensors inside
:func:`lmadapt.training.fsdp.gathered`, which every process enters.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmadapt.errors import LmadaptError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` processes (1: no distribution)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, draws progress and writes files."""
        return self.rank == 0

    def shard(self, rows: Sequence[T]) -> list[T]:
        """This rank's rows of a global micro-batch (rows r, r + world_size, ...)."""
        return list(rows[self.rank::self.world_size]) if self.enabled else list(rows)

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is True on any rank (every rank gets the same answer)."""
        return self.sum([float(flag)], device)[0] > 0 if self.enabled else flag

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks in place (a missing gradient counts as zeros)."""
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                summed = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += p.numel()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def main_first(self, action: Callable[[], T]) -> T | None:
        """Run ``action`` on rank 0 only, then let every rank continue together (its result on rank 0)."""
        result = action() if self.is_main else None
        self.barrier()
        return result


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment(device_spec: str = "auto") -> Distributed:
    """The process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
    initialised once: gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). One process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise LmadaptError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_spec != "cpu"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Distributed(rank, world, local)


def device_for(dist_info: Distributed, spec: str) -> str:
    """The model.device a rank uses: under torchrun on CUDA, each rank takes ``cuda:LOCAL_RANK``."""
    if dist_info.enabled and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{dist_info.local_rank}"
    return spec


def gathered_state(component: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``component`` saves, as one process would save them: a method's ``adapter_state(model)``,
    or an objective's ``trainable_state(model)`` (its heads). Under data parallelism every rank holds them
    whole; under FSDP they are whole only inside :func:`lmadapt.training.fsdp.gathered`, and a shard read
    outside it is refused here rather than written as a fraction of the tensor."""
    from lmadapt.training.fsdp import is_shard

    state = component.adapter_state(model) if hasattr(component, "adapter_state") else component.trainable_state(model)
    shards = [k for k, v in state.items() if is_shard(v)]
    if shards:
        raise LmadaptError(f"{shards[0]} is one process's shard of an FSDP-sharded tensor: save inside "
                           f"lmadapt.training.fsdp.gathered(model), which every process enters, so that it is whole")
    return state
