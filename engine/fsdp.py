"""Sharding a run's state over the ranks of a torchrun job: FSDP2 (torch.distributed.fsdp.fully_shard: ZeRO-2 and
ZeRO-3, CPU offload, hybrid sharding) for models too big to replicate with DDP, and ZeRO-1's optimizers
(engine/optim.py); and their state dicts: under FSDP each rank's shards (what engine/sharded_checkpoint.py writes),
loaded back from shards or from a whole state (one process's checkpoint); ZeRO-1's gathered on rank 0.

Each transformer block is its own FSDP unit (all-gathered just before it runs, freed after), the rest of the model
is the root unit. Under FSDP every rank must take part in each forward pass and each state-dict call.
"""

import torch

from engine.errors import UserError

# torch.distributed's checkpoint and FSDP modules are imported where they are used, only by sharded runs: importing
# them costs about a second of every start-up.


def shard_model(
    model: torch.nn.Module, rt, compile: bool = False, stage: int = 3, offload: bool = False, hsdp: int = 0
) -> None:
    """Shard `model` in place across the process group (rt: engine/runtime.py's Runtime): one FSDP unit per block,
    plus the root.

    stage 3 (ZeRO-3; also 0, fsdp=True alone): each unit's parameters are gathered for its forward, freed after it
    and gathered again for its backward. stage 2: kept gathered from forward to backward (FSDP2's
    reshard_after_forward=False): one all-gather per step instead of two, the whole parameters held meanwhile;
    gradients and optimizer state stay sharded.
    offload: the shards, their gradients and the optimizer step live in CPU memory (FSDP2's CPUOffloadPolicy), copied
    to the GPU for each unit's forward and backward. hsdp=N (hybrid sharding): shards within each group of N
    processes (a node), whole copies across groups (a 2-D DeviceMesh), so the gradients cross nodes once per step.
    In bf16/fp16 the units all-gather their parameters in that dtype and reduce gradients in float32 (torchtitan's
    policy); the float32 shards stay the master weights. compile=True compiles each block before sharding it, so
    FSDP's hooks sit between graphs rather than breaking one graph of the whole forward (torchtitan does the same)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if hsdp and rt.world_size % hsdp:
        raise UserError(f"hsdp={hsdp} must divide the {rt.world_size} processes into equal groups")
    if hsdp:
        mesh = init_device_mesh(rt.device_type, (rt.world_size // hsdp, hsdp), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    # (pinned memory, for fast copies to the GPU, exists only beside one)
    offload_policy = CPUOffloadPolicy(pin_memory=rt.device_type == "cuda") if offload else OffloadPolicy()
    options = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload_policy, "reshard_after_forward": stage != 2}
    for block in model.all_blocks():
        if compile:
            block.compile()  # in place (keeps parameter names): the module's call runs a compiled forward
        fully_shard(block, **options)
    fully_shard(model, **options)


def model_state(model: torch.nn.Module, sharded: bool) -> dict:
    """The model's state dict: under FSDP each rank's shards (DTensors; nothing is gathered), else its tensors."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def is_distributed(state: dict) -> bool:
    """Whether a (nested) state dict holds shards (DTensors) rather than whole tensors."""
    values = list(state.values())
    while values:
        v = values.pop()
        if isinstance(v, dict):
            values.extend(v.values())
        elif hasattr(v, "device_mesh"):
            return True
    return False


def load_model_state(model: torch.nn.Module, state: dict, sharded: bool, strict: bool = True) -> None:
    """Load a state dict into `model`: under FSDP into its shards (a collective), from shards of the same names or
    from whole tensors on every rank (a checkpoint of one process). strict=False: some of the weights (LoRA's)."""
    if not sharded:
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=not is_distributed(state), strict=strict)
    set_model_state_dict(model, state, options=options)


def optimizer_state(model: torch.nn.Module, optimizer, sharded: bool, local: bool = False) -> dict:
    """The optimizer's state dict keyed by parameter name (FQN), the one format every mode reads: one process, DDP
    and FSDP (each rank's shards of the moments, as DTensors). Under FSDP an optimizer that has not stepped gets its
    state made first (torch takes a step of learning rate 0, which changes no weight): a template to load into."""
    if is_zero(optimizer) and local:  # ZeRO-1, each rank's own part (its optimizer of the parameters it owns)
        return {"local": optimizer.optim.state_dict()}
    if is_zero(optimizer):  # ZeRO-1: a collective, every rank's part gathered on rank 0 (the others get nothing)
        optimizer.consolidate_state_dict(to=0)
        whole = optimizer.state_dict() if torch.distributed.get_rank() == 0 else {"state": {}}
        return _by_name(model, optimizer, whole) if whole["state"] else not_stepped()
    if not sharded:
        return _by_name(model, optimizer, optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Load an optimizer state dict into `optimizer`: under FSDP from shards or from a whole state (sharding it); an
    optimizer saved before it stepped is emptied again.
    Only the state (moments, step counts) comes from the checkpoint: the hyperparameters of each group (learning
    rate, weight decay, betas) stay those the optimizer was built with, so a resumed run follows its own command
    line."""
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if "local" in state:  # ZeRO-1, a rank's own part (optimizer_state's local)
        optimizer.optim.load_state_dict(state["local"])
    elif not state.get("param_groups"):  # one that had not stepped (not_stepped()): fresh again
        (optimizer.optim if is_zero(optimizer) else optimizer).state.clear()
    elif sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=not is_distributed(state))
        set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, state), options=options)
    else:  # (ZeRO-1: every rank holds the whole state, read from a checkpoint, and keeps its part)
        optimizer.load_state_dict(_by_index(model, optimizer, _by_name(model, optimizer, state)))
    for group, own in zip(optimizer.param_groups, hyper, strict=True):
        group.update(own)


def not_stepped() -> dict:
    """The state dict saved for an optimizer that has not stepped."""
    return {"state": {}, "param_groups": []}


def is_zero(optimizer) -> bool:
    """Whether `optimizer` is ZeRO-1's (engine/optim.py): its state is spread over the ranks, by parameter."""
    return hasattr(optimizer, "consolidate_state_dict")


def _names(model: torch.nn.Module, optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its order (what optimizer.state_dict()'s integers count)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekey(state: dict, key_of: dict) -> dict:
    return {
        "state": {key_of[k]: v for k, v in state["state"].items()},
        "param_groups": [g | {"params": [key_of[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def _by_name(model: torch.nn.Module, optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by integers (optimizer.state_dict(), as older checkpoints hold) rekeyed by
    parameter name: integer i is the i-th parameter of the optimizer's groups, which build_optimizers orders the same
    way every time. A state already keyed by name is returned as it is."""
    keys = [k for group in state["param_groups"] for k in group["params"]]
    if not keys or not isinstance(keys[0], int):
        return state
    names = _names(model, optimizer)
    if len(names) != len(keys):
        raise ValueError(f"the saved optimizer state has {len(keys)} parameters, this optimizer {len(names)}")
    return _rekey(state, dict(zip(keys, names, strict=True)))


def _by_index(model: torch.nn.Module, optimizer, state: dict) -> dict:
    """The inverse of _by_name, for optimizer.load_state_dict (which pairs saved and current parameters by position,
    hence the sort)."""
    state = _rekey(state, {name: i for i, name in enumerate(_names(model, optimizer))})
    return state | {"param_groups": [g | {"params": sorted(g["params"])} for g in state["param_groups"]]}
