"""Data parallelism under torchrun: joining the process group, wrapping the objective (DDP or
FSDP), skipping gradient sync during accumulation, and whole state dicts for checkpoints.

DDP keeps a full copy of the model on every rank and all-reduces gradients. FSDP shards
parameters, gradients and optimizer state over the ranks (PyTorch's FSDP2 `fully_shard`, one
unit per block plus the root); a checkpoint gathers them into one full state dict, so a run
saved by FSDP reads like any other. (On gloo a custom gradient divide factor would need
ReduceOp.PREMUL_SUM, which gloo lacks; the default FSDP2 reduction already averages there.)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


def distributed_init() -> tuple[int, int]:
    """(rank, world_size); joins the process group when launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def blocks(objective: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model inside `objective` (FSDP's wrapping units)."""
    model = getattr(objective, "model", objective)
    return list(getattr(model, "layers", []))


def wrap(objective: nn.Module, kind: str, world: int) -> nn.Module:
    """The module that training calls: `objective` itself alone, else DDP or FSDP around it."""
    if world == 1:
        return objective
    device = next(objective.parameters()).device
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in blocks(objective):
        fully_shard(block)
    fully_shard(objective)  # averages gradients, on gloo too (tests/test_fsdp.py checks it)
    return objective


def no_sync(wrapped: nn.Module, world: int, sync: bool):
    """A context that skips the gradient reduction of a micro-batch that is not the last."""
    if sync or world == 1:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    return _fsdp_no_sync(wrapped)


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def sharded(objective: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in objective.parameters())


def full_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with whole tensors; under FSDP every rank must call it."""
    if not sharded(objective):
        return objective.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state(objective: nn.Module) -> dict:
    """The objective's state dict with whole tensors; under FSDP every rank must call it."""
    if not sharded(objective):
        return objective.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(objective: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    if not sharded(objective):
        objective.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(objective, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def as_float(x: Any) -> float:
    """A float from a tensor that may be a DTensor (FSDP's gradient norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)
