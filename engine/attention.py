"""Attention probabilities recomputed from a model's own modules. The model computes attention inside SDPA, which never
returns them, so attention_weights() captures each attention module's input with a forward pre-hook and forms
softmax(q k^T / sqrt(hs) + mask) with that module's c_attn, QK-norm, RoPE tables or ALiBi or T5 bias, key heads
repeated for grouped-query attention exactly as SDPA's enable_gqa does. tests/test_attention.py checks that these
weights times the values reproduce the model's attention output for every architecture switch. tools/attention.py
draws them; engine/health.py takes their entropy.
"""

import math

import torch
from torch.nn import functional as F

from model import GPT, CausalSelfAttention, apply_rope


def layer_attention(model: GPT, attn: CausalSelfAttention, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
    """Attention probabilities (B, nh, T, T) of module `attn` for its input x (B, T, C) at positions 0..T-1 (an
    encoder's over every key but, with padding_mask (B, T) bool, the padding)."""
    B, T, _ = x.size()
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.hs
    q, k, _ = attn.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], 2)
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if model.config.pos_embedding == "rope":
        rope = (model.rope_cos[:T], model.rope_sin[:T])  # each (T, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs): query head h reads key head h // (nh / nkv)
    scale = 1 / math.sqrt(hs) if attn.scale is None else attn.scale  # (T5's attention is unscaled)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, T, T)
    pos = torch.arange(T, device=x.device)
    if not attn.causal:  # an encoder's: every key, with ALiBi's or T5's bias both ways
        bias = model.encoder_mask(pos, padding_mask, torch.float32)
        if bias is not None and bias.dtype == torch.bool:  # padding hidden: as -inf scores
            bias = torch.zeros((), device=x.device).masked_fill(~bias, float("-inf"))
    else:  # ALiBi's or T5's bias (nh, T, T), -inf above the diagonal; else none
        bias = model.attention_mask(pos, T, 0, torch.float32)
    if bias is not None:
        scores = scores + bias
    elif attn.causal:
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))  # a key after the query: masked
    return F.softmax(scores, dim=-1)


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities, float32 (B, nh, T, T), for token ids idx (B, T). Call under eval():
    attention dropout is not applied."""
    inputs: list[torch.Tensor] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        for block in model.transformer.h
    ]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    keep = idx != model.config.pad_id if model.config.n_labels else None  # a classifier masks its padding
    return [layer_attention(model, b.attn, x, keep) for b, x in zip(model.transformer.h, inputs, strict=True)]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """The entropy in nats of each attention distribution: (..., T, T) probabilities -> (..., T)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)
