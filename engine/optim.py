"""Optimizers and learning-rate schedules.

Optimizers: AdamW with weight-decay groups (matrices decayed; biases and norm gains not), or Muon (Jordan et al.
2024, torch.optim.Muon) for the 2-D matrices inside the transformer blocks with AdamW for everything else
(embeddings, lm_head, 1-D parameters, MoE routers), as Muon's authors recommend. The fused q|k|v matrix is three
linear maps stacked in one tensor, so Muon orthogonalises its three row blocks one by one (as modded-nanogpt does).

Schedules (a multiplier of each group's own base learning rate): linear warmup, then cosine decay to min_lr
(Loshchilov & Hutter 2017), warmup-stable-decay (Hu et al. 2024, MiniCPM: constant, then a linear decay over the last
decay_fraction of the run), or constant.
"""

import inspect
import math

import torch

from model import CausalSelfAttention

SCHEDULES = ("cosine", "wsd", "constant")


# torch.optim.Muon arrived in torch 2.9; train.py refuses optimizer=muon on older versions before building this
class BlockwiseMuon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):
    """torch.optim.Muon, with the matrices named in `row_blocks` (id(parameter) -> row counts) orthogonalised block
    by block: each block gets its own Newton-Schulz iteration and its own shape's learning-rate adjustment. The
    momentum and the state dict are those of the whole parameter, so checkpoints are the same as plain Muon's."""

    def __init__(self, params, row_blocks: dict[int, list[int]], **kwargs):
        super().__init__(params, **kwargs)
        self.row_blocks = row_blocks

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        blocks = [self.row_blocks.get(id(p)) for p in params_with_grad]
        for tensors in (params_with_grad, grads, muon_momentum_bufs):
            # views: Muon's in-place updates of a block land in the parameter (and its momentum buffer)
            tensors[:] = [
                piece for t, rows in zip(tensors, blocks, strict=True) for piece in (t.split(rows) if rows else [t])
            ]
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        """Muon's step; under FSDP (parameters sharded as DTensors) one matrix at a time: its shards, its gradient's
        and its momentum's gathered whole, stepped as in one process (orthogonalisation needs the whole matrix), and
        each rank's pieces of the new weights and momentum kept. The momentum stays sharded between steps."""
        if not any(hasattr(p, "device_mesh") for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        from torch.distributed.tensor import distribute_tensor
        from torch.optim._muon import muon  # the functional step torch.optim.Muon.step runs

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyper = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)  # (sharded as p is)
                buf = self.state[p]["momentum_buffer"]
                whole = {"p": p.full_tensor(), "grad": p.grad.full_tensor(), "buf": buf.full_tensor()}
                rows = self.row_blocks.get(id(p))
                pieces = {k: list(t.split(rows)) if rows else [t] for k, t in whole.items()}
                muon(pieces["p"], pieces["grad"], pieces["buf"], **{k: group[k] for k in hyper}, has_complex=False)
                for sharded, new in ((p, whole["p"]), (buf, whole["buf"])):
                    mine = distribute_tensor(new, sharded.device_mesh, sharded.placements, src_data_rank=None)
                    sharded.to_local().copy_(mine.to_local())
        return loss


def build_optimizers(
    model: torch.nn.Module,
    name: str,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    muon_learning_rate: float | None = None,
    zero: bool = False,
) -> list:
    """The optimizers for `model`: [AdamW] or [Muon, AdamW], each sharded ZeRO-1 style with zero (see _build). Every
    parameter is in exactly one group; each group records its base learning rate as "base_lr" for the schedule to
    scale."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    # The fused kernel (one pass over all parameters) exists for CUDA and, since torch 2.4, for CPU tensors too.
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if name == "adamw":
        muon_params = []
    elif name == "muon":
        # MoE routers stay in AdamW: a router's rows are per-expert scores, not a linear map to orthogonalise
        muon_params = [
            p
            for n, p in params.items()
            if p.dim() == 2 and n.startswith(("transformer.h.", "decoder.h.")) and not n.endswith("router.weight")
        ]
    else:
        raise ValueError(f"unknown optimizer {name!r}; use adamw or muon")
    in_muon = {id(p) for p in muon_params}
    rest = [p for p in params.values() if id(p) not in in_muon]
    adamw_groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizers = [_build(torch.optim.AdamW, zero, adamw_groups, lr=learning_rate, betas=betas, fused=fused or None)]
    if muon_params:
        # "match_rms_adamw" scales Muon's orthogonalised update to AdamW's typical size (Liu et al. 2025, Moonshot),
        # so Muon can share AdamW's learning rate.
        qkv_rows = {  # fused projections: q|k|v, and a cross-attention's k|v, each orthogonalised on its own
            id(m.c_kv.weight if m.cross else m.c_attn.weight): [m.n_head * m.hs] * (not m.cross)
            + [m.n_kv_head * m.hs] * 2
            for m in model.modules()
            if isinstance(m, CausalSelfAttention)
        }
        muon = _build(
            BlockwiseMuon,
            zero,
            muon_params,
            row_blocks=qkv_rows,
            lr=muon_learning_rate or learning_rate,
            weight_decay=weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        optimizers.insert(0, muon)
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def _build(kind, zero: bool, params, **options):
    """The optimizer `kind` over params; zero: ZeRO-1 (torch.distributed.optim.ZeroRedundancyOptimizer): each rank
    keeps the state of, and steps, only the whole parameters it owns (about 1/world_size of them), then sends their
    new values to the other ranks. Each parameter's step is the one-process step (Muon's included: every rank owns
    whole matrices)."""
    if not (zero and torch.distributed.is_initialized()):  # (one process: nothing to shard across)
        return kind(params, **options)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=kind, **options)


def setup_training(
    model: torch.nn.Module,
    optimizer: str,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    muon_learning_rate: float | None = None,
    recompute_every: int = 0,
    zero: bool = False,
) -> list:
    """Make `model` ready to train, as train.py and bench/train_speed.py both do: its blocks recomputed in the
    backward pass every recompute_every-th one (0: no recomputation, the default), and its optimizers (zero: ZeRO-1,
    their state sharded across the ranks)."""
    model.recompute_every = recompute_every
    adamw = (weight_decay, learning_rate, betas, device_type)
    return build_optimizers(model, optimizer, *adamw, muon_learning_rate, zero)


def build_optimizer(
    model: torch.nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """nanoGPT's optimizer: AdamW with matrices decayed and 1-D parameters not."""
    return build_optimizers(model, "adamw", weight_decay, learning_rate, betas, device_type)[0]


def lr_at(
    it: int,
    learning_rate: float,
    warmup_iters: int,
    lr_decay_iters: int,
    min_lr: float,
    decay_lr: bool = True,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate at iteration `it`: linear warmup from 0 over warmup_iters, then the schedule: cosine decay to
    min_lr at lr_decay_iters, or warmup-stable-decay (constant, then linear to min_lr over the last decay_fraction
    of lr_decay_iters), or constant; min_lr after lr_decay_iters. decay_lr=False keeps learning_rate (nanoGPT)."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        # the decay starts after warmup even when decay_fraction would put it inside: the rate never jumps back up
        decay_start = max(lr_decay_iters - decay_fraction * lr_decay_iters, warmup_iters)
        if it < decay_start:
            return learning_rate
        return learning_rate + (min_lr - learning_rate) * (it - decay_start) / max(1.0, lr_decay_iters - decay_start)
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; use {', '.join(SCHEDULES)}")
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizers: list, scale: float) -> None:
    """Every parameter group's learning rate: its own base rate times the schedule's scale."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
