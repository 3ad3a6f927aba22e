"""Per-layer health of a training run, every health_interval iterations (train.py --health_interval): for each block
its gradient norm (after clipping: what the optimizer uses), its update-to-weight ratio ||w_after - w_before|| /
||w_before|| over the step, the RMS of its output on a probe batch, and for MoE blocks the share of tokens each
expert gets. Computed on the master under torch.no_grad, only on those iterations; the probe is a forward pass of
the unwrapped model (its hooks never touch the compiled or DDP-wrapped one, so nothing recompiles).
"""

import torch

QUANTITIES = ("grad_norm", "update_ratio", "act_rms")  # the per-layer lists of a health record


@torch.no_grad()
def before_step(model) -> tuple[list[float], list[list[torch.Tensor]]]:
    """(each block's gradient norm, a copy of each block's weights) just before the optimizer step."""
    norms, weights = [], []
    for block in model.transformer.h:
        params = [p for p in block.parameters() if p.requires_grad]
        grads = [p.grad.norm() for p in params if p.grad is not None]
        norms.append(torch.stack(grads).norm() if grads else torch.zeros((), device=params[0].device))
        weights.append([p.detach().clone() for p in params])
    return torch.stack(norms).tolist(), weights


@torch.no_grad()
def update_ratios(model, before: list[list[torch.Tensor]]) -> list[float]:
    ratios = []
    for block, old in zip(model.transformer.h, before, strict=True):
        params = [p for p in block.parameters() if p.requires_grad]
        change = torch.stack([(p - w).float().norm() for p, w in zip(params, old, strict=True)]).norm()
        ratios.append(change / torch.stack([w.float().norm() for w in old]).norm().clamp_min(1e-12))
    return torch.stack(ratios).tolist()


@torch.no_grad()
def probe(model, x: torch.Tensor, autocast) -> tuple[list[float], list[list[float]] | None]:
    """(each block's output RMS, each MoE block's per-expert token share or None) on the batch x."""
    rms, loads, hooks = [], [], []
    for block in model.transformer.h:
        hooks.append(block.register_forward_hook(lambda m, i, out: rms.append(out.float().pow(2).mean().sqrt())))
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:  # each expert runs once per forward, on the tokens routed to it
            counts = []
            loads.append(counts)
            for expert in experts:
                hooks.append(expert.register_forward_hook(lambda m, i, out, c=counts: c.append(i[0].size(0))))
    training = model.training
    model.eval()
    try:
        with autocast():
            model(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    shares = [[n / max(1, sum(counts)) for n in counts] for counts in loads]
    return torch.stack(rms).tolist(), shares or None


def summary(record: dict) -> str:
    """The compact console line: each quantity's range over the layers."""
    parts = []
    for name, label in zip(QUANTITIES, ("grad norm", "update/weight", "output rms"), strict=True):
        values = record[name]
        parts.append(f"{label} {min(values):.3g}..{max(values):.3g}")
    line = f"health {record['iter']} (layer min..max): {', '.join(parts)}, clipped {record['clipped_steps']} steps"
    if record.get("expert_load"):
        busiest = max(max(layer) for layer in record["expert_load"])
        line += f", busiest expert {busiest:.0%} of tokens"
    return line
