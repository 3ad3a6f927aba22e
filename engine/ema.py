"""An exponential moving average of the weights (Polyak averaging): float32 copies updated after every optimizer step,
ema = d * ema + (1 - d) * weight, which often evaluates better than the raw weights late in a run.

The decay warms up: after t updates d = min(decay, (1 + t) / (10 + t)), as in timm's ModelEmaV2 and TensorFlow's
ExponentialMovingAverage(num_updates=...). With a fixed 0.999 a 2,000-step run's average would still hold 0.999**2000
= 13.5% of the random init; warmed up, the init's share is the product of the decays, 1 / C(t + 9, 9) (about 1e-24 at
t = 2,000), and the full decay applies from t = (10 * decay - 1) / (1 - decay) on (8,990 updates at 0.999).

Only the parameters that train are averaged (a frozen LoRA base equals its own average). Under FSDP the average is
sharded as the weights are (each rank averages its shards), and state_dict() gathers it whole (a collective: call it
on every rank) or gives the shards (what a sharded checkpoint holds). train.py saves the average in state.pt,
restores it on resume, evaluates with it beside the raw weights, and sample.py, tools/evaluate.py and
tools/export_hf.py load it with --weights=ema.
"""

import contextlib

import torch

UPDATES = "#updates"  # state_dict key of the update count, beside the parameter names: no name of ours has a '#'


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        # updates done so far: a plain int, the same on every rank (each calls update() after every step). None: an
        # average saved before the count was kept, whose count is unknown (see load_state_dict)
        self.updates: int | None = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.average = [params[n].detach().float().clone() for n in self.names]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup or self.updates is None:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.average, [params[n].detach().float() for n in self.names], weight)
        if self.updates is not None:
            self.updates += 1

    def state_dict(self, sharded: bool = False) -> dict[str, torch.Tensor]:
        """The whole average on the CPU, by parameter name (under FSDP gathered from every rank's shards; sharded:
        this rank's shards themselves, what a sharded checkpoint writes and loads into), and the update count as a
        0-d tensor under UPDATES (readers of the average skip that key)."""
        state = {n: t if sharded else _whole(t).cpu() for n, t in zip(self.names, self.average, strict=True)}
        return state | ({UPDATES: torch.tensor(self.updates)} if self.updates is not None else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"the saved average lacks {', '.join(missing[:3])}")
        for t, n in zip(self.average, self.names, strict=True):
            saved = state[n]
            if saved is not t:  # (a sharded checkpoint loads into the average itself)
                t.copy_(saved if hasattr(saved, "device_mesh") else _like(saved.to(t.device), t))
        # An average saved before the count was kept was updated with the full decay from its first step, and after
        # an unknown number of steps: it goes on with the full decay (warming up again would let the next steps'
        # weights overwrite most of it), and is saved again without a count, so a later resume agrees.
        self.updates = int(state[UPDATES]) if UPDATES in state else None

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
    """FSDP keeps the root unit's weights gathered after a forward pass (and every unit's under ZeRO-2, which does
    not reshard after forward): back to the shards, which we swap."""
    for module in model.modules():
        if hasattr(module, "reshard"):
            module.reshard()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard (a DTensor): gathered


def _like(whole: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`whole` split as t is: t's shard of it when t is a DTensor (every rank holds `whole`), else itself."""
    if not hasattr(t, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, t.device_mesh, t.placements)
