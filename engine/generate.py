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


class Decoder:
    """KV-cache decoding for one model, reusable across calls: the cache is allocated once and kept while the batch
    size stays the same, so repeated calls (a chat, a benchmark) reuse its memory and, compiled, its graphs.

    compile=True decodes with static shapes through torch.compile: the position is a device tensor and each step
    feeds a fresh (B, 1) token tensor, so there are two graphs (prefill, decode; a third once a sequence outgrows
    block_size and re-prefills) whatever the number of tokens. On CUDA it uses "reduce-overhead" mode, which
    captures the one-token step as a CUDA graph, since a small model at batch 1 is bound by kernel launches, not
    arithmetic. Greedy decoding (temperature 0, no repetition penalty) picks the token inside that step too, in its
    own compiled function (so its graphs and the sampling ones do not share one recompile budget; each vocab_size is
    a graph of its own). Call under model.eval(); for bf16/fp16, cast the model (model.to(dtype)) rather than
    autocast, so a compiled step does not re-cast every weight on every token."""

    def __init__(self, model, kv_cache: bool = True, compile: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.static = compile and kv_cache
        self.steps = {False: self.logits, True: self.greedy}  # keyed by greedy
        if self.static:
            device = next(model.parameters()).device
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.steps = {greedy: torch.compile(f, mode=mode, dynamic=False) for greedy, f in self.steps.items()}
        self.cache = None

    def logits(self, idx, kv_cache=None, start_pos=0, vocab_size: int | None = None):
        """The last position's logits (B, V) over the ids below vocab_size."""
        logits, _ = self.model(idx, kv_cache=kv_cache, start_pos=start_pos)
        return logits[:, -1, :vocab_size]

    def greedy(self, idx, kv_cache=None, start_pos=0, vocab_size: int | None = None):
        """The most likely next token (B, 1): compiled, the choice runs in the step's graph."""
        return self.logits(idx, kv_cache, start_pos, vocab_size).float().argmax(dim=-1, keepdim=True)

    def _cache_for(self, batch_size: int):
        if self.cache is None or self.cache[0].k.size(0) != batch_size:
            self.cache = self.model.new_kv_cache(batch_size)
            if self.static:  # fixed addresses, so a captured graph may update them in place
                for layer in self.cache:
                    torch._dynamo.mark_static_address(layer.k)
                    torch._dynamo.mark_static_address(layer.v)
        return self.cache

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        generator=None,
        vocab_size: int | None = None,
    ):
        """Yield (B, 1) new tokens, one step at a time, continuing idx (B, T). vocab_size: ids from it up (the padding
        of a vocabulary rounded up for speed) are never sampled. Nothing here waits for the device: a caller that
        reads a token (streaming, stop strings) syncs then, one that collects them does not."""
        block_size = self.model.config.block_size
        greedy = sampling.temperature == 0 and sampling.repetition_penalty == 1.0
        step = self.steps[greedy]
        filled = 0  # positions of the sequence held in the cache
        pos = None  # static: the next position, as a device tensor
        token = None
        for _ in range(max_new_tokens):
            if not self.kv_cache:
                out = step(idx[:, -block_size:], vocab_size=vocab_size)  # eager: kv_cache=False never compiles
            elif token is not None and filled < block_size:  # decode one position: the fresh (B, 1) token
                start = pos if self.static else filled
                out = step(token, self.cache, start, vocab_size)
                filled += 1
                if self.static:
                    pos = pos + 1
            else:  # prefill the prompt, or re-prefill the last block_size tokens once the sequence has outgrown it
                # a fresh (B, T) tensor with row stride T: the slice keeps the growing idx's row stride, which Dynamo
                # guards on, and at batch 1 .contiguous() returns that slice unchanged (a size-1 dimension counts as
                # contiguous whatever its stride), so every token past block_size would recompile
                context = idx[:, -block_size:].clone(memory_format=torch.contiguous_format)
                cache = self._cache_for(idx.size(0))
                start = torch.zeros((), dtype=torch.long, device=idx.device) if self.static else 0
                out = step(context, cache, start, vocab_size)
                filled = context.size(1)  # at block_size the cache is full and the next step re-prefills
                if self.static:
                    pos = torch.full((), filled, dtype=torch.long, device=idx.device)
            # (B, 1); a CUDA graph's output buffer is overwritten by its next replay, so the chosen token is copied
            token = out.clone() if greedy else next_token(out, sampling, idx, generator)
            idx = torch.cat((idx, token), dim=1)
            yield token


def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    kv_cache: bool = True,
    generator=None,
    compile: bool = False,
    vocab_size: int | None = None,
):
    """Yield (B, 1) new tokens continuing idx (B, T), with a Decoder made for this call (see Decoder)."""
    return Decoder(model, kv_cache, compile).generate(idx, max_new_tokens, sampling, generator, vocab_size)


@torch.no_grad()
def extend(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    kv_cache: bool = True,
    generator=None,
) -> torch.Tensor:
    """idx (B, T) followed by max_new_tokens generated tokens, (B, T + max_new_tokens): what nanoGPT's
    model.generate(idx, max_new_tokens, temperature, top_k) returns. Call under model.eval()."""
    steps = generate(model, idx, max_new_tokens, sampling or Sampling(), kv_cache, generator)
    return torch.cat([idx, *steps], dim=1)


@torch.no_grad()
def transduce(
    model,
    source: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    end: int,
    generator=None,
    kv_cache: bool = True,
    vocab_size: int | None = None,
    compile: bool = False,
):
    """An encoder-decoder's output for source rows (B, S) (padded with its pad_id): the source is encoded once, then
    the decoder yields (B, 1) tokens one step at a time from its start token (pad_id), with its self-attention KV
    cache and the cross-attention keys and values computed at the first step (kv_cache=False: every step reads the
    whole output so far, uncached, the reference the cache must equal). compile=True runs the steps after the first
    through torch.compile with static shapes (the position a tensor, the cache read whole under its mask): one graph
    whatever the length, as Decoder's. A row that has produced `end` goes on with `end`; the steps stop when every
    row has, after max_new_tokens, or at block_size. Call under model.eval()."""
    memory, keep = model.encode(source)
    out = torch.full((source.size(0), 1), model.config.pad_id, dtype=torch.long, device=source.device)
    cache = model.new_kv_cache(source.size(0)) if kv_cache else None
    step = torch.compile(model.decode, dynamic=False) if compile and kv_cache else model.decode
    done = torch.zeros(source.size(0), dtype=torch.bool, device=source.device)
    for t in range(min(max_new_tokens, model.config.block_size)):
        if not kv_cache:
            logits = model.decode(out, memory, keep)
        elif t == 0 or step is model.decode:  # the first step fills the cross-attention cache, eagerly
            logits = model.decode(out[:, -1:], memory, keep, cache, t)
        else:
            logits = step(out[:, -1:].clone(), memory, keep, cache, torch.tensor(t, device=source.device))
        token = next_token(logits[:, -1, :vocab_size], sampling, out[:, 1:], generator).masked_fill(done[:, None], end)
        out = torch.cat([out, token], dim=1)
        done |= token[:, 0] == end
        yield token
        if done.all():
            return


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
