"""FSDP2 (torch.distributed.fsdp.fully_shard): shard parameters, gradients and optimizer state across the ranks of a
torchrun job, for models too big to replicate with DDP; and gather full state dicts, so a checkpoint written by a
sharded run is the same format a single process writes and loads (sample.py included).

Each transformer block is its own FSDP unit (all-gathered just before it runs, freed after), the rest of the model
is the root unit. Under FSDP every rank must take part in each forward pass and each state-dict gather.
"""

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module, device_type: str, world_size: int) -> None:
    """Shard `model` in place across the process group: one FSDP unit per block, plus the root."""
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def model_state(model: torch.nn.Module, sharded: bool) -> dict:
    """The full state dict (a collective under FSDP: call it on every rank)."""
    return get_model_state_dict(model, options=FULL) if sharded else model.state_dict()


def optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict:
    """The optimizer's full state dict, keyed as a single process keys it (a collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL) if sharded else optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Load a full optimizer state dict, sharding it when the model is sharded."""
    if sharded:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
