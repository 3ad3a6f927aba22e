"""Text generation: sampling controls, the KV-cache decoding loop, stop strings and UTF-8-safe streaming.

Kept out of model.py so the model stays a model: this file only calls GPT.forward (with or without its KV cache).

Decoding with the cache: one prefill of the prompt, then one position per step. Once a sequence is longer than
block_size, every step re-prefills its last block_size tokens: the same context the uncached path crops to, so both
paths produce the same tokens (past block_size the cached path is no faster than the uncached one).
"""

import codecs
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p (nucleus)
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL, Keskar et al. 2019)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every token already in the sequence, divide its logit by `penalty` when positive and
    multiply it when negative. logits (B, V), seen (B, T) token ids."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)  # (B, T)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each setting the logits of dropped tokens to -inf. (B, V) float."""
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p; the most likely always stays
        drop = (probs.cumsum(dim=-1) - probs) >= s.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if s.min_p is not None:
        probs = F.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, s: Sampling, seen: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row from the last-position logits (B, V), given the sequence so far (B, T). Returns (B, 1)."""
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits, s), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    kv_cache: bool = True,
    generator=None,
    compile: bool = False,
):
    """Yield (B, 1) new tokens, one step at a time, continuing idx (B, T). Call under model.eval().

    compile=True (with the cache) decodes with static shapes through torch.compile: on CUDA in "reduce-overhead"
    mode, which captures the one-token step as a CUDA graph, since a small model at batch 1 is bound by kernel
    launches, not arithmetic."""
    block_size = model.config.block_size
    forward = model
    if compile and kv_cache:
        mode = "reduce-overhead" if idx.device.type == "cuda" else None
        forward = torch.compile(model, mode=mode, dynamic=False)
    cache, filled = None, 0  # filled: positions of the sequence held in the cache

    def position(p: int):  # a tensor keeps the compiled step's shapes (and its CUDA graph) the same every step
        return torch.tensor(p, device=idx.device) if compile else p

    for _ in range(max_new_tokens):
        if not kv_cache:
            logits, _ = model(idx[:, -block_size:])
        elif cache is not None and filled < block_size:  # decode one position
            logits, _ = forward(idx[:, -1:], kv_cache=cache, start_pos=position(filled))
            filled += 1
        else:  # prefill the prompt, or re-prefill the last block_size tokens once the sequence has outgrown it
            context = idx[:, -block_size:]
            cache = cache or new_cache(model, idx.size(0), static=compile)
            logits, _ = forward(context, kv_cache=cache, start_pos=position(0))
            filled = context.size(1)  # at block_size the cache is full and the next step re-prefills
        token = next_token(logits[:, -1, :], sampling, idx, generator)
        idx = torch.cat((idx, token), dim=1)
        yield token


def new_cache(model, batch_size: int, static: bool):
    cache = model.new_kv_cache(batch_size)
    if static:  # fixed addresses, so a captured graph may update them in place
        for layer in cache:
            torch._dynamo.mark_static_address(layer.k)
            torch._dynamo.mark_static_address(layer.v)
    return cache


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character that a BPE token cut
    in two: bytes are decoded incrementally and held back until the character is complete."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes  # id -> bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text cut before the first occurrence of any stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
