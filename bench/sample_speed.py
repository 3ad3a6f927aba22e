"""Decoding speed: tokens/s of engine/generate.py with and without the KV cache, GPT-2 124M shapes, random weights.

    python bench/sample_speed.py                                   # batch 1 and 16, 500 new tokens, both paths
    python bench/sample_speed.py --batch_sizes=1 --new_tokens=500 --device=cuda --dtype=bfloat16
    python bench/sample_speed.py --uncached_tokens=100             # the slow path on fewer tokens
    python bench/sample_speed.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --vocab_size=65 \
        --batch_sizes=1 --new_tokens=400                           # the shakespeare_char model

Both paths run in the same process on the same weights, greedy, from a one-token prompt, after a warm-up run of each;
the uncached path recomputes the whole context every step (nanoGPT's sample.py). It prints tokens/s (new tokens
of all sequences per second) and the cached/uncached ratio. Where --uncached_tokens is lower than --new_tokens the
ratio compares the measured per-token rates of the two runs, which flatters the uncached path (its steps grow with
the context), so the full-length comparison is the honest one.
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
from engine.generate import Sampling, generate
from engine.runtime import DTYPES
from model import GPT, GPTConfig


def timed(model, batch_size, n, kv_cache, device) -> float:
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in generate(model, idx, n, Sampling(temperature=0), kv_cache=kv_cache):
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@dataclass
class SampleSpeedConfig:
    batch_sizes: str = "1,16"  # comma-separated
    new_tokens: int = 500
    uncached_tokens: int | None = None  # tokens for the uncached run (default: all)
    device: str = "cpu"
    dtype: str = "float32"  # float32, bfloat16 or float16
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def main(argv=None):
    args = parse_config(SampleSpeedConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    torch.manual_seed(0)
    shape = {k: getattr(args, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    model = GPT(GPTConfig(**shape))
    model = model.to(args.device, DTYPES[args.dtype]).eval()
    print(
        f"{', '.join(f'{k}={v}' for k, v in shape.items())}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, greedy, {args.new_tokens} new tokens"
    )
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for kv_cache in (True, False):  # warm-up: allocator, kernels, CPU caches
            timed(model, batch_size, 32, kv_cache, args.device)
        rates = {}
        for kv_cache, n in ((True, args.new_tokens), (False, args.uncached_tokens or args.new_tokens)):
            dt = timed(model, batch_size, n, kv_cache, args.device)
            rates[kv_cache] = batch_size * n / dt
            print(
                f"batch {batch_size:>3}, {'cached' if kv_cache else 'uncached':>8}: {n} tokens in {dt:7.2f} s = "
                f"{rates[kv_cache]:9.1f} tokens/s"
            )
        print(f"batch {batch_size:>3}: cached / uncached = {rates[True] / rates[False]:.1f}x")


if __name__ == "__main__":
    run_cli(main)
