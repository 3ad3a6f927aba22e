"""LoRA (Hu et al. 2021): fine-tune a frozen GPT through low-rank updates of its blocks' Linear layers.

A targeted layer computes W x + b + (alpha / r) B A x, with A (r, in) and B (out, r) the only weights that train: A
starts random (as nn.Linear's own init), B at zero, so training starts from the base model exactly. The optimizer
holds state for the adapters alone, which is what lets GPT-2 XL fine-tune where full AdamW state would not fit.
Parameter names stay the base model's (c_attn.weight) plus c_attn.lora_A / c_attn.lora_B, so a merged model
(merge_lora: W += (alpha / r) B A) is a plain GPT with the base's names, for export and fast inference.

On chat data the template's special tokens are new to the base model: their rows of the token embedding (and of an
untied lm_head) train too, as a parameter of their own (NewRows: transformer.wte.rows), so the optimizer holds state
for those few rows rather than the whole matrix (38.6M values for GPT-2's 50k rows).
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


class NewRows(nn.Module):
    """A frozen token embedding or output layer (weight (V, C), no bias) whose rows from `start` on are the trainable
    parameter `rows` (V - start, C) instead: what the layer computes is that of weight[:start] stacked on rows. A tied
    embedding and lm_head share one `rows`, as they share one weight."""

    def __init__(self, base: nn.Embedding | nn.Linear, start: int, rows: nn.Parameter):
        super().__init__()
        self.weight, self.rows, self.start = base.weight, rows, start  # weight keeps the base layer's name
        self.embedding = isinstance(base, nn.Embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:  # x: (B, T) ids; a new id's vector comes from rows
            new = (x >= self.start).unsqueeze(-1)  # (B, T, 1)
            return torch.where(new, F.embedding((x - self.start).clamp(min=0), self.rows), F.embedding(x, self.weight))
        logits = F.linear(x, self.weight)  # (B, T, V); the new ids' columns replaced by rows' (their grad flows there)
        logits[..., self.start :] = F.linear(x, self.rows)
        return logits

    def merged(self) -> torch.Tensor:
        return torch.cat([self.weight[: self.start], self.rows.to(self.weight.dtype)])


def parse_targets(targets: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names or set(names) - set(TARGETS):
        raise ValueError(f"lora_targets must be a comma-separated subset of {','.join(TARGETS)}, got {targets!r}")
    return names


def targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every Linear layer the targets name in the blocks (MoE routers left out; an
    encoder-decoder's cross-attention is "attn" too)."""
    found = []
    for block in model.all_blocks():
        parts = [getattr(block, target) for target in targets]
        parts += [block.cross] if "attn" in targets and hasattr(block, "cross") else []
        for part in parts:
            for name, module in part.named_modules():
                if isinstance(module, nn.Linear) and not name.endswith("router"):
                    parent_name, _, attr = name.rpartition(".")
                    found.append((part.get_submodule(parent_name) if parent_name else part, attr, module))
    return found


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    trainable: tuple[str, ...] = (),
    new_rows_from: int | None = None,
):
    """Freeze every parameter of `model` (a GPT), wrap the targeted Linear layers of its blocks in LoRALinear, and
    leave trainable only the adapters, the rows of the token embedding and lm_head from new_rows_from on (NewRows:
    a chat template's tokens), and the parameters named in `trainable` (checkpoints of older runs trained the whole
    embedding)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, layer in targeted(model, targets):
        setattr(parent, attr, LoRALinear(layer, rank, alpha))
    if new_rows_from is not None:
        rows = {}  # by the weight, so a tied embedding and lm_head share their rows
        for parent, attr in embedding_layers(model):
            layer = getattr(parent, attr)
            if id(layer.weight) not in rows:
                rows[id(layer.weight)] = nn.Parameter(layer.weight.detach()[new_rows_from:].clone())
            setattr(parent, attr, NewRows(layer, new_rows_from, rows[id(layer.weight)]))
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place: the model becomes a plain GPT with the same outputs."""
    merged_rows = {}  # by the rows, so a tied embedding and lm_head stay one parameter
    for parent, attr in embedding_layers(model):
        layer = getattr(parent, attr)
        if isinstance(layer, NewRows):
            if id(layer.rows) not in merged_rows:
                with torch.no_grad():
                    merged_rows[id(layer.rows)] = nn.Parameter(layer.merged(), requires_grad=False)
            vocab, width = layer.weight.shape
            meta = torch.device("meta")  # no weight allocated: it is replaced
            plain = nn.Embedding(vocab, width, device=meta) if layer.embedding else nn.Linear(width, vocab, False, meta)
            plain.weight = merged_rows[id(layer.rows)]
            setattr(parent, attr, plain.to(layer.weight.device))
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


def embedding_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the token embedding and the output layer (a classifier has none)."""
    return [(model.transformer, "wte")] + ([(model, "lm_head")] if hasattr(model, "lm_head") else [])


def lora_params(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """How many parameters add_lora's adapters would train: r * (in + out) for each targeted layer."""
    return sum(rank * (layer.in_features + layer.out_features) for _, _, layer in targeted(model, targets))
