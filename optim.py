"""Optimizer and learning-rate schedule: AdamW with weight-decay groups, linear warmup then cosine decay."""

import inspect
import math

import torch


def build_optimizer(
    model: torch.nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """AdamW where only matrices (2-D and up: Linear weights, embeddings) are decayed; biases and norm gains are not.
    Uses the fused CUDA kernel when available."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)


def lr_at(
    it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float, decay_lr: bool = True
) -> float:
    """Learning rate at iteration `it`: linear warmup from 0 over warmup_iters, cosine decay to min_lr at
    lr_decay_iters (Loshchilov & Hutter 2017), then min_lr; constant learning_rate when decay_lr is False."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)
