"""LoRA (Hu et al. 2021): fine-tune a frozen GPT through low-rank updates of its blocks' Linear layers.

A targeted layer computes W x + b + (alpha / r) B A x, with A (r, in) and B (out, r) the only weights that train: A
starts random (as nn.Linear's own init), B at zero, so training starts from the base model exactly. The optimizer
holds state for the adapters alone, which is what lets GPT-2 XL fine-tune where full AdamW state would not fit.
Parameter names stay the base model's (c_attn.weight) plus c_attn.lora_A / c_attn.lora_B, so a merged model
(merge_lora: W += (alpha / r) B A) is a plain GPT with the base's names, for export and fast inference.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

TARGETS = ("attn", "mlp")  # the blocks' attention projections (c_attn, c_proj) and MLP layers (not MoE routers)


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are the base layer's own (frozen) tensors, plus the low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear's __init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, alpha
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the paper's code does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * (
            self.alpha / self.rank
        )


def parse_targets(targets: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names or set(names) - set(TARGETS):
        raise ValueError(f"lora_targets must be a comma-separated subset of {','.join(TARGETS)}, got {targets!r}")
    return names


def targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every Linear layer the targets name in the blocks (MoE routers left out)."""
    found = []
    for block in model.transformer.h:
        for target in targets:
            part = getattr(block, target)
            for name, module in part.named_modules():
                if isinstance(module, nn.Linear) and not name.endswith("router"):
                    parent_name, _, attr = name.rpartition(".")
                    found.append((part.get_submodule(parent_name) if parent_name else part, attr, module))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], trainable: tuple[str, ...] = ()):
    """Freeze every parameter of `model` (a GPT), wrap the targeted Linear layers of its blocks in LoRALinear, and
    leave trainable only the adapters and the parameters named in `trainable` (e.g. a grown token embedding)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, layer in targeted(model, targets):
        setattr(parent, attr, LoRALinear(layer, rank, alpha))
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place: the model becomes a plain GPT with the same outputs."""
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            if isinstance(module, LoRALinear):
                merged = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                with torch.no_grad():
                    delta = (module.lora_B @ module.lora_A) * (module.alpha / module.rank)
                    merged.weight = nn.Parameter(
                        module.weight + delta.to(module.weight.dtype), requires_grad=module.weight.requires_grad
                    )
                    merged.bias = module.bias
                setattr(parent, name, merged.to(module.weight.device))


def lora_params(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """How many parameters add_lora's adapters would train: r * (in + out) for each targeted layer."""
    return sum(rank * (layer.in_features + layer.out_features) for _, _, layer in targeted(model, targets))
