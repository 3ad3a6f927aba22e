"""Encoder-decoder decoding speed: tokens/s of engine/generate.py's transduce with and without its caches (the
decoder's self-attention KV cache, and the cross-attention keys and values of the encoder's output computed once),
random weights of T5 v1.1's layout.

    python bench/seq2seq_speed.py                                  # batch 1 and 16, 64 source and 64 new tokens
    python bench/seq2seq_speed.py --n_layer=8 --n_embd=512 --n_head=8 --source_tokens=256 --device=cuda

Both paths run in the same process on the same weights and sources, greedy, after a warm-up run of each, for exactly
--new_tokens steps (no row ends early). The uncached path runs the decoder over the whole
output so far at every step, as an encoder-decoder without caches does; both encode the source once. It prints new
tokens of all sequences per second and the cached/uncached ratio.
"""

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import torch

from engine.configurator import parse_config
from engine.errors import run_cli
from engine.generate import Sampling, transduce
from engine.runtime import DTYPES
from model import GPT, GPTConfig


@dataclass
class Seq2SeqSpeedConfig:
    batch_sizes: str = "1,16"  # comma-separated
    source_tokens: int = 64  # tokens of each source
    new_tokens: int = 64  # tokens generated per source
    device: str = "cpu"
    dtype: str = "float32"  # float32, bfloat16 or float16
    n_layer: int = 4  # encoder blocks, and as many decoder blocks
    n_head: int = 4
    n_embd: int = 256
    vocab_size: int = 32128  # T5's

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if min(self.source_tokens, self.new_tokens) < 1:
            raise ValueError("source_tokens and new_tokens must be >= 1")


def timed(model, source, n: int, kv_cache: bool) -> float:
    """Seconds for n greedy steps of every row of source (end=-1: no row ends early)."""
    sync = torch.cuda.synchronize if source.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in transduce(model, source, n, Sampling(temperature=0), end=-1, kv_cache=kv_cache):
        pass
    sync()
    return time.perf_counter() - t0


def main(argv=None):
    cfg = parse_config(Seq2SeqSpeedConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    config = GPTConfig(
        arch="encoder_decoder", block_size=max(cfg.source_tokens, cfg.new_tokens) + 1, vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, bias=False, pos_embedding="t5", attn_scale=False,
        norm="rmsnorm", mlp="geglu", tie_embeddings=False, pad_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).to(cfg.device, DTYPES[cfg.dtype]).eval()
    print(f"{model.num_params() / 1e6:.1f}M parameters, {cfg.source_tokens} source tokens, {cfg.new_tokens} new tokens")
    print("| batch | cached tok/s | uncached tok/s | cached / uncached |")
    print("|---|---|---|---|")
    rows = []
    for batch in (int(b) for b in cfg.batch_sizes.split(",")):
        source = torch.randint(2, cfg.vocab_size, (batch, cfg.source_tokens), device=cfg.device)
        rates = {}
        for kv_cache in (True, False):
            timed(model, source, min(8, cfg.new_tokens), kv_cache)  # warm-up
            rates[kv_cache] = batch * cfg.new_tokens / timed(model, source, cfg.new_tokens, kv_cache)
        print(f"| {batch} | {rates[True]:,.0f} | {rates[False]:,.0f} | {rates[True] / rates[False]:.2f} |")
        rows.append({"batch": batch, "cached": rates[True], "uncached": rates[False]})
    return rows


if __name__ == "__main__":
    run_cli(main)
