"""What fits where: the bytes a GPT config needs (parameters from the config alone, activations by Korthikanti et
al. 2022's estimate, the formulas in tools/sizing.py's docstring), and the check that refuses, before anything is
allocated, a model or a training run that cannot fit in the device's memory. Used by train.py, checkpoint.py,
hf_interop.py and tools/sizing.py; imports only torch and the model's config."""

import contextlib
import os

import torch

from engine.errors import UserError
from model import GPTConfig


def activation_bytes(config: GPTConfig, batch_size: int, checkpointing: bool, flash: bool) -> int:
    """Activation memory of one micro-batch's forward, kept for the backward (formulas in the module docstring)."""
    s, b, h, a, L = config.block_size, batch_size, config.n_embd, config.n_head, config.n_layer
    per_layer = 34 * s * b * h + (0 if flash else 5 * a * s * s * b)
    logits = 6 * s * b * config.vocab_size
    if checkpointing:
        return L * 2 * s * b * h + per_layer + logits
    return L * per_layer + logits


def estimate_params(c: GPTConfig) -> int:
    """The parameter count from the config alone, without building anything (biases and norm gains left out: a
    fraction of a percent). What check_fits needs for a config too big to build even on the meta device."""
    attention = c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_size + c.n_embd * c.n_embd
    expert = c.n_embd * c.mlp_hidden * (3 if c.mlp in ("swiglu", "geglu") else 2)
    mlp = expert * (c.n_expert + int(c.moe_shared_expert)) + c.n_embd * c.n_expert if c.n_expert else expert
    embeddings = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    positions = c.block_size * c.n_embd if c.pos_embedding == "learned" else 0
    decoder = c.n_dec_layer * (2 * attention + mlp) + positions if c.arch == "encoder_decoder" else 0  # + cross
    return c.n_layer * (attention + mlp) + embeddings + positions + decoder


def device_memory(device: str) -> int | None:
    """Bytes of memory on `device` (the machine's RAM for the CPU), or None when unknown."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_fits(
    config: GPTConfig,
    device: str,
    batch_size: int = 0,
    shards: int = 1,
    checkpointing: bool = False,
    trainable: int | None = None,
):
    """Refuse, before anything is allocated, a model that cannot fit in `device`'s memory: its float32 weights, and
    when training (batch_size > 0) gradients and AdamW state of the `trainable` parameters (all by default; LoRA's
    adapters), divided over FSDP's `shards`, and one micro-batch's activations. A lower bound, so nothing that could
    fit is refused; what it refuses would end in an allocator error minutes later (or take the machine down)."""
    have = device_memory(device)
    n = estimate_params(config)
    t = n if trainable is None else trainable
    need = n * 4 if not batch_size else (n * 4 + t * 12) // shards
    need += activation_bytes(config, batch_size, checkpointing, True) if batch_size else 0
    if have is not None and need > have:
        what = "training this model" if batch_size else "this model"
        knobs = "n_layer, n_embd, vocab_size" + (" or batch_size" if batch_size else "")
        raise UserError(
            f"{what} needs at least {need / 2**30:,.1f} GiB ({n / 1e9:,.2f}B parameters), more than the "
            f"{have / 2**30:,.0f} GiB of {device}; lower {knobs}"
        )


def check_sampling_fits(config: GPTConfig, device: str, num_samples: int, dtype_bytes: int) -> None:
    """Refuse, before the batch is built, sampling that cannot fit: the weights, and for num_samples sequences the
    KV cache (keys and values of every layer for block_size positions) and the float32 logits of one step."""
    have = device_memory(device)
    cache = 2 * config.n_layer * num_samples * config.n_kv_head * config.block_size * config.head_size
    need = estimate_params(config) * dtype_bytes + cache * dtype_bytes + num_samples * config.vocab_size * 4
    if have is not None and need > have:
        raise UserError(
            f"sampling {num_samples:,} sequences at once needs at least {need / 2**30:,.1f} GiB (their KV cache "
            f"{cache * dtype_bytes / 2**30:,.1f} GiB), more than the {have / 2**30:,.0f} GiB of {device}; lower "
            "--num_samples"
        )


def check_scoring_fits(config: GPTConfig, device: str, batch_size: int, dtype_bytes: int) -> None:
    """Refuse, before the first batch, scoring batch_size windows at once that cannot fit: the weights, one layer's
    activations of the batch and its float32 logits with their log-softmax (nothing is kept for a backward)."""
    have = device_memory(device)
    s, h = config.block_size, config.n_embd
    need = estimate_params(config) * dtype_bytes + batch_size * s * (34 * h + 8 * config.vocab_size)
    if have is not None and need > have:
        raise UserError(
            f"scoring {batch_size:,} windows of {s} tokens at once needs at least {need / 2**30:,.1f} GiB, more than "
            f"the {have / 2**30:,.0f} GiB of {device}; lower --batch_size"
        )


@contextlib.contextmanager
def out_of_memory_hint(device: str, batch_size: int, block_size: int):
    """Running out of device memory is a one-line error saying which settings to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # the CPU allocator reports running out as a plain RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise UserError(
            f"out of memory on {device} with batch_size={batch_size}, block_size="
            f"{block_size}; lower --batch_size (raise --gradient_accumulation_steps to keep the "
            "tokens per step) or --block_size"
        ) from None
