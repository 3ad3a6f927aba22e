"""An exponential moving average of the weights (Polyak averaging): float32 copies updated after every optimizer step,
ema = decay * ema + (1 - decay) * weight, which often evaluates better than the raw weights late in a run.

Only the parameters that train are averaged (a frozen LoRA base equals its own average). Under FSDP the average is
sharded as the weights are (each rank averages its shards), and state_dict() gathers it whole (a collective: call it
on every rank). train.py saves the average in state.pt, restores it on resume, evaluates with it beside the raw
weights, and sample.py, tools/evaluate.py and tools/export_hf.py load it with --weights=ema.
"""

import contextlib

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.average = [params[n].detach().float().clone() for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        torch._foreach_lerp_(self.average, [params[n].detach().float() for n in self.names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole average on the CPU, by parameter name (under FSDP gathered from every rank's shards)."""
        return {n: _whole(t).cpu() for n, t in zip(self.names, self.average, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"the saved average lacks {', '.join(missing[:3])}")
        for t, n in zip(self.average, self.names, strict=True):
            t.copy_(_like(state[n].to(t.device), t))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: torch.nn.Module):
        """The model with the average as its weights inside the block, its own weights back after it."""
        _reshard(model)
        params = dict(model.named_parameters())
        kept = [params[n].detach().clone() for n in self.names]
        for n, t in zip(self.names, self.average, strict=True):
            params[n].copy_(t)
        try:
            yield model
        finally:
            _reshard(model)  # (else the next forward would use the average, gathered)
            for n, t in zip(self.names, kept, strict=True):
                params[n].copy_(t)


def _reshard(model: torch.nn.Module) -> None:
    """FSDP keeps the root unit's weights gathered after a forward pass: back to the shards, which we swap."""
    if hasattr(model, "reshard"):
        model.reshard()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard (a DTensor): gathered


def _like(whole: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`whole` split as t is: t's shard of it when t is a DTensor (every rank holds `whole`), else itself."""
    if not hasattr(t, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, t.device_mesh, t.placements)
