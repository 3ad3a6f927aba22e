"""FP8 training (train.py --fp8): the blocks' Linear layers run their matmuls in FP8 with torchao's float8 recipe
(dynamic scaling), on NVIDIA GPUs with FP8 tensor cores; the master weights stay as they are."""

import torch

from engine.errors import UserError


def enable_fp8(model, device: str) -> None:
    """Swap the blocks' Linear layers for FP8 training ones (torchao's float8 recipe); master weights unchanged."""
    capable = device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)
    if not capable:
        raise UserError(
            f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
            f"this run is on {device}"
        )
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("--fp8 uses torchao's float8 training: pip install torchao") from None
    convert_to_float8_training(model, module_filter_fn=fp8_eligible)


def fp8_eligible(module: torch.nn.Module, name: str) -> bool:
    """Which Linear layers train in FP8: those in the blocks whose dimensions are multiples of 16 (FP8 matmuls need
    them), except MoE routers (their choice is kept in float32). lm_head and the embeddings stay in bf16, where FP8
    hurts accuracy most."""
    blocks = name.startswith(("transformer.h.", "decoder.h."))
    if not isinstance(module, torch.nn.Linear) or not blocks or name.endswith("router"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0
