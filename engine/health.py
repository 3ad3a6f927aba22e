"""Per-layer health of a training run, every health_interval iterations (train.py --health_interval): for each block
its gradient norm (after clipping: what the optimizer uses), its update-to-weight ratio ||w_after - w_before|| /
||w_before|| over the step, the RMS of its output and its attention entropy (mean over heads) on a probe batch, and
for MoE blocks the share of tokens each expert gets. Computed on the master under torch.no_grad, only on those
iterations; the probe is a forward pass of the unwrapped model (its hooks never touch the compiled or DDP-wrapped
one, so nothing recompiles). Low entropy: heads that look at one token; log(positions): heads that look at all alike.
"""

import torch

from engine.attention import entropy, layer_attention

QUANTITIES = ("grad_norm", "update_ratio", "act_rms", "attn_entropy")  # the per-layer lists of a health record
ENTROPY_POSITIONS = 1024  # attention entropy is taken over at most this many positions (memory: T^2 per head)


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
def probe(model, x: torch.Tensor, autocast) -> dict:
    """On the batch x (B, T): each block's output RMS (act_rms); its attention entropy in nats, the mean over heads
    and query positions of x's first sequence, its first ENTROPY_POSITIONS positions at most (attn_entropy); and for
    MoE blocks each expert's share of the tokens (expert_load)."""
    rms, inputs, loads, hooks = [], [], [], []
    for block in model.transformer.h:
        hooks.append(block.register_forward_hook(lambda m, i, out: rms.append(out.float().pow(2).mean().sqrt())))
        # causal attention: the first positions' probabilities need nothing after them
        hooks.append(block.attn.register_forward_pre_hook(lambda m, i: inputs.append(i[0][:1, :ENTROPY_POSITIONS])))
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
            blocks = zip(model.transformer.h, inputs, strict=True)
            entropies = [entropy(layer_attention(model, block.attn, h)).mean() for block, h in blocks]
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    record = {"act_rms": torch.stack(rms).tolist(), "attn_entropy": torch.stack(entropies).tolist()}
    shares = [[n / max(1, sum(counts)) for n in counts] for counts in loads]
    return record | ({"expert_load": shares} if shares else {})


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
