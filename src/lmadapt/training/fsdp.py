"""Fully sharded data parallelism for the one loop: ``train.distributed: fsdp`` under torchrun (FSDP2).

Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (arXiv:2304.11277), in torch's
per-parameter form (``torch.distributed.fsdp.fully_shard``, "FSDP2").

:func:`shard` makes each transformer block (:func:`lmadapt.models.tree.transformer_blocks`) a unit, and the
whole model the root unit over what is left (embeddings, final norm, head). Every parameter, frozen base weight
and adapter factor alike, becomes a DTensor sharded on dim 0: rank r of n holds ``chunk(p, n)[r]``. A unit's
forward all-gathers its parameters and frees them after; its backward gathers them again and reduce-scatters
the gradients of the trainable ones. Each rank so keeps 1/n of the weights, of the gradients and of AdamW's
moments (the optimizer is built after sharding, over the sharded parameters, by the one factory).

It computes what one process with the same global batch computes (docs/distributed.md):

- Gradients are *summed* over the ranks, as under ddp, since the loop divides the loss by the global count of
  loss-bearing units: divide factor 1, with sum-only collectives (gloo has no ``PREMUL_SUM``).
- The clipping norm is that of the whole gradient, ``sqrt(sum over ranks of |shard|^2)``, and every shard is
  scaled by the same ``min(1, max_norm / norm)`` (:func:`clip_gradients`).
- Every rank runs a forward and a backward for every micro-batch, since the all-gathers are collective: a rank
  without rows in a short last micro-batch runs a stand-in whose loss counts zero (the loop does this).
- Saving reads whole tensors: inside :func:`gathered` the parameters a save reads (the trainable ones and every
  parameter of lmadapt's own modules, which hold what methods save and export) are whole on rank 0, and so are
  AdamW's moments: the adapter and checkpoint files are byte for byte the format one process writes. A resume
  gathers on every rank, loads, and writes each rank's chunk back (``write_back``).

Mixed precision follows ``train.precision``: fp32 casts nothing; bf16 all-gathers the parameters in bf16 for
the forward and backward and reduces the gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``: a sum over ranks in bf16 would drop the low bits of every gradient). fp16 is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from lmadapt.errors import LmadaptError
from lmadapt.models.tree import transformer_blocks

if TYPE_CHECKING:
    from lmadapt.methods import Method
    from lmadapt.training.config import TrainConfig

# Method hooks that change parameters, their trainable set or the optimizer's state between optimizer steps,
# outside a forward: on sharded parameters they would see (or write) one rank's chunk, so they are refused.
BETWEEN_STEP_HOOKS = ("before_optimizer_step", "after_optimizer_step", "on_step_end")


def fsdp_problems(train: TrainConfig, method: Method, *, evals: bool) -> list[str]:
    """What keeps this run from training sharded (empty: nothing); each problem names the setting and the way out.

    ``evals``: the run has ``evals:`` (they run on rank 0 alone, and a forward of a sharded model needs every
    process)."""
    from lmadapt.methods import Method

    ddp = "or train with train.distributed: ddp"
    problems = []
    hooks = [h for h in BETWEEN_STEP_HOOKS if getattr(type(method), h) is not getattr(Method, h)]
    if hooks:
        problems.append(f"train.distributed: fsdp: method {method.name!r} changes its parameters, trainable set or "
                        f"optimizer state between steps ({', '.join(hooks)}), which lmadapt has not made work on "
                        f"FSDP's sharded parameters; train it with train.distributed: ddp")
    if train.precision == "fp16":
        problems.append(f"train.precision: fp16 with train.distributed: fsdp: lmadapt has not made fp16's loss "
                        f"scaling work on sharded gradients; use bf16 (all-gathers in bf16, gradients summed in "
                        f"fp32), {ddp}")
    if train.lae_momentum is not None:
        problems.append(f"train.lae_momentum: LAE's offline copy reads whole parameters after every step; with "
                        f"train.distributed: fsdp they are sharded. Set lae_momentum: null, {ddp}")
    if evals:
        problems.append(f"evals: run on rank 0 alone, and a forward of an FSDP-sharded model needs every process; "
                        f"drop evals: and evaluate the saved adapter afterwards (lmadapt eval), {ddp}")
    return problems


def shard(model: nn.Module, precision: str, device: torch.device) -> None:
    """Shard ``model`` in place over the default process group: each transformer block, then the root.

    Call after the method is applied and the objective set up, and before the optimizer is built. Gradients
    are summed over the ranks, not averaged (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise LmadaptError(f"train.distributed: fsdp shards a model block by block, and this {type(model).__name__} "
                           f"has no transformer blocks (modules named <...>.layers.<i>, h.<i>, blocks.<i>); train "
                           f"it with train.distributed: ddp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for name in blocks:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard` (or another ``fully_shard``) has sharded ``model``."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_shard(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor: a shard of a whole tensor that other processes hold the rest of."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _read_by_saves(module: nn.Module, param: nn.Parameter) -> bool:
    """The parameters a save may read: trainable ones, and every one of lmadapt's own modules (adapter layers
    keep frozen starts, residuals and stage-1 values there; a base layer of transformers holds only the base).
    The class's bases are looked at too: ``fully_shard`` swaps a unit's class for a subclass made in torch."""
    return param.requires_grad or any(c.__module__.startswith("lmadapt.") for c in type(module).__mro__)


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, everywhere: bool = False,
             write_back: bool = False) -> Iterator[None]:
    """Inside, the parameters a save reads are whole plain tensors in the model (and ``optimizer``'s state
    tensors whole in its state), as one process holds them: on rank 0, or on every rank with ``everywhere``.
    With ``write_back`` (and ``everywhere``) each rank's chunk of every such parameter is set from what the
    model holds at the end, so whatever a load wrote inside lands in the shards. Every process must enter it
    (the gathers are collective). Nothing happens for an unsharded model."""
    if write_back and not everywhere:
        raise ValueError("gathered(write_back=True) needs everywhere=True: every rank writes its own chunk back")
    if not is_sharded(model):
        yield
        return
    keep = everywhere or dist.get_rank() == 0
    whole: dict[int, nn.Parameter | None] = {}  # one whole tensor per shard: tied parameters stay tied
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for module in model.modules():  # the same order on every rank
            for name, p in list(module._parameters.items()):
                if is_shard(p) and _read_by_saves(module, p):
                    if id(p) not in whole:
                        full = p.full_tensor()  # collective; a rank that keeps nothing drops it at once
                        whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if keep else None
                    swapped.append((module, name, p))
        moments = _gather_state(optimizer, keep) if optimizer is not None else []
    try:
        if keep:
            for module, name, p in swapped:
                module._parameters[name] = whole[id(p)]
            for state, key, shard_value, value in moments:
                state[key] = value
        yield
        if write_back:
            with torch.no_grad():
                for module, name, p in swapped:
                    _write_chunk(p, module._parameters[name], name)
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
        for state, key, shard_value, _ in moments:
            state[key] = shard_value


def _gather_state(optimizer: torch.optim.Optimizer, keep: bool) -> list[tuple[dict, str, Any, torch.Tensor]]:
    """(state dict, key, shard, whole tensor) for every sharded state tensor, in parameter order on every rank."""
    found = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in sorted(state):
                if is_shard(state[key]):
                    value = state[key].full_tensor()
                    found.append((state, key, state[key], value if keep else None))
    return found


def _write_chunk(shard_param: nn.Parameter, value: torch.Tensor, name: str) -> None:
    """Set this rank's chunk of ``shard_param`` from the whole tensor ``value`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(value.shape) != tuple(shard_param.shape):
        raise LmadaptError(f"a load changed the shape of {name} from {tuple(shard_param.shape)} to "
                           f"{tuple(value.shape)}, which a sharded model cannot follow; train with "
                           f"train.distributed: ddp")
    mine = distribute_tensor(value.detach().to(shard_param.dtype), shard_param.device_mesh, shard_param.placements,
                             src_data_rank=None)
    shard_param.to_local().copy_(mine.to_local())


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After a resume loaded whole state tensors (``optimizer.load_state_dict``), keep only each rank's chunk of
    those of sharded parameters, as training made them (``step`` counters stay plain)."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_shard(p):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not is_shard(value) and tuple(value.shape) == tuple(p.shape):
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                   src_data_rank=None)


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the whole gradient of sharded ``params`` to ``max_norm`` (``inf``: only measure); returns its norm.

    ``norm = sqrt(sum_i |g_i|^2)`` over every shard of every rank, and each shard is scaled by
    ``min(1, max_norm / (norm + 1e-6))``, torch's ``clip_grad_norm_`` on the whole gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if is_shard(norm):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return float(norm)
