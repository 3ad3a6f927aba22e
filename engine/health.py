"""Per-layer health of a training run, every health_interval iterations (train.py --health_interval): for each block
its gradient norm (after clipping: what the optimizer uses), its update-to-weight ratio ||w_after - w_before|| /
||w_before|| over the step, the RMS of its output and its attention entropy (mean over heads) on a probe batch, and
for MoE blocks the share of tokens each expert gets. Computed under torch.no_grad, only on those iterations, on the
master (under FSDP on every rank, each summing its shards into the whole); the probe is a forward pass of the
unwrapped model (its hooks never touch the compiled or DDP-wrapped one, so nothing recompiles). Low entropy: heads
that look at one token; log(positions): heads that look at all alike.
"""

import torch
import torch.distributed

from engine.attention import entropy, layer_attention

QUANTITIES = ("grad_norm", "update_ratio", "act_rms", "attn_entropy")  # the per-layer lists of a health record
ENTROPY_POSITIONS = 1024  # attention entropy is taken over at most this many positions (memory: T^2 per head)


@torch.no_grad()
def before_step(model, sharded: bool = False) -> tuple[list[float], list[list[torch.Tensor]]]:
    """(each block's gradient norm, a copy of each block's weights) just before the optimizer step. sharded: an FSDP
    model, whose ranks each hold shards of the gradients and weights (a collective: call it on every rank)."""
    squares, weights = [], []
    for block in model.transformer.h:
        params = [p for p in block.parameters() if p.requires_grad]
        grads = [_local(p.grad).float().pow(2).sum() for p in params if p.grad is not None]
        squares.append(torch.stack(grads).sum() if grads else torch.zeros((), device=_local(params[0]).device))
        weights.append([_local(p.detach()).clone() for p in params])
    return _over_ranks(torch.stack(squares), sharded).sqrt().tolist(), weights


@torch.no_grad()
def update_ratios(model, before: list[list[torch.Tensor]], sharded: bool = False) -> list[float]:
    """Each block's ||w_after - w_before|| / ||w_before|| (before: before_step's copies)."""
    change, size = [], []
    for block, old in zip(model.transformer.h, before, strict=True):
        params = [_local(p.detach()) for p in block.parameters() if p.requires_grad]
        change.append(torch.stack([(p - w).float().pow(2).sum() for p, w in zip(params, old, strict=True)]).sum())
        size.append(torch.stack([w.float().pow(2).sum() for w in old]).sum())
    change, size = _over_ranks(torch.stack([torch.stack(change), torch.stack(size)]), sharded).sqrt()
    return (change / size.clamp_min(1e-12)).tolist()


@torch.no_grad()
def probe(model, x: torch.Tensor, autocast) -> dict:
    """On the batch x (B, T): each block's output RMS (act_rms); its attention entropy in nats, the mean over heads
    and query positions of x's first sequence, its first ENTROPY_POSITIONS positions at most (attn_entropy); and for
    MoE blocks each expert's share of the tokens (expert_load). Under FSDP every rank must probe (on its own x)."""
    rms, entropies, hooks = [], [], []
    for block in model.transformer.h:
        seen = {}  # the attention's input; causal, so the first positions' probabilities need nothing after them
        hooks.append(
            block.attn.register_forward_pre_hook(lambda m, i, s=seen: s.update(x=i[0][:1, :ENTROPY_POSITIONS]))
        )

        def after(block, i, out, seen=seen):
            rms.append(out.float().pow(2).mean().sqrt())
            entropies.append(entropy(layer_attention(model, block.attn, seen["x"])).mean())

        hooks.append(block.register_forward_hook(after, prepend=True))  # first: before FSDP reshards the weights
    training = model.training
    model.eval()
    try:
        with autocast(), torch.compiler.set_stance("force_eager"):  # compiled blocks (FSDP) run their hooks too
            model(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    record = {"act_rms": torch.stack(rms).tolist(), "attn_entropy": torch.stack(entropies).tolist()}
    shares = [block.mlp.load.tolist() for block in model.transformer.h if hasattr(block.mlp, "load")]  # MoE blocks
    return record | ({"expert_load": shares} if shares else {})


def record(
    model, grads_before: tuple, x: torch.Tensor, iter_num: int, clipped_steps: int, autocast, sharded: bool
) -> dict:
    """This step's per-layer telemetry as a log record: grads_before is before_step's, x the step's last batch."""
    norms, weights = grads_before
    probed = probe(model, x, autocast)  # act_rms, attn_entropy and for MoE expert_load
    ratios = update_ratios(model, weights, sharded)
    record = {"iter": iter_num, "grad_norm": norms, "update_ratio": ratios}
    return record | probed | {"clipped_steps": clipped_steps}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's shard of an FSDP tensor


def _over_ranks(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Sums of squares over the shards: summed over the ranks under FSDP."""
    if sharded:
        torch.distributed.all_reduce(t)
    return t


def summary(record: dict) -> str:
    """The compact console line: each quantity's range over the layers."""
    parts = []
    for name, label in zip(QUANTITIES, ("grad norm", "update/weight", "output rms", "attn entropy"), strict=True):
        values = record[name]
        parts.append(f"{label} {min(values):.3g}..{max(values):.3g}")
    line = f"health {record['iter']} (layer min..max): {', '.join(parts)}, clipped {record['clipped_steps']} steps"
    if record.get("expert_load"):
        busiest = max(max(layer) for layer in record["expert_load"])
        line += f", busiest expert {busiest:.0%} of tokens"
    return line
