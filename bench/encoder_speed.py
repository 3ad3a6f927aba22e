"""An encoder's training step next to a decoder's of the same shape: ms/iter of each, their ratio, and the ratio of
their FLOPs.

    python bench/encoder_speed.py config/train_shakespeare_char_bert.py --device=cpu
    python bench/encoder_speed.py config/train_gpt2.py --batch_size=8 --gradient_accumulation_steps=1 --device=cuda

Takes every train.py option (presets, then --key=value; --arch is set here) plus --rounds, --steps and --burn_in.
Each round times bench/train_speed.py's step (synthetic tokens: forward, backward, clipping, the optimizer) for a
decoder and then an encoder of the same shape, in one process on the same machine; the medians over the rounds are
compared, so a slow moment of a shared machine does not fall on one side only.

What differs: the encoder's attention has no mask (every query sees every key; a decoder's is causal) and it has
BERT's MLM head (a dense n_embd x n_embd layer, its activation and norm, and a bias on the output layer). By the PaLM
count (6N + 12LCT, which counts full attention for both) the encoder has 6 * n_embd^2 more FLOPs per token (1.016 to
1.020 at the shapes below). Measured on 2 CPU cores, bf16 autocast: 1.083 at config/train_shakespeare_char_bert.py's
shape (n_embd 128, block 64), 1.004 with --block_size=256 --batch_size=8, and 1.035 with --n_embd=384 --n_head=6
--batch_size=16 (5 rounds). The gap beyond the FLOPs is the head's elementwise work (activation, norm, bias over
every position), which a FLOP count ignores and which weighs most in the smallest models. On GPUs, causal attention
kernels (flash attention) also skip the masked half of the score matrix, so there an encoder's attention costs up to
twice a decoder's where attention is a large share of the step (not measured here: no GPU).
"""

import os
import statistics
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

from bench.train_speed import measure
from engine.configurator import describe_fields, parse_config
from engine.errors import UserError, run_cli


@dataclass
class EncoderSpeedOptions:
    rounds: int = 3  # decoder-then-encoder timings; the medians are compared
    steps: int = 10  # timed steps per measurement
    burn_in: int = 3  # untimed steps first (compilation, allocator warm-up)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + describe_fields(EncoderSpeedOptions) + "\n  and every train.py option but --arch")
        return
    own = {f"--{name}" for name in EncoderSpeedOptions.__dataclass_fields__}
    mine = [a for a in argv if a.partition("=")[0] in own]
    opts = parse_config(EncoderSpeedOptions, mine)
    train_argv = [a for a in argv if a not in mine]
    if any(a.startswith("--arch=") for a in train_argv):
        raise UserError("--arch is set here (each round times both); leave it out")
    if opts.rounds < 1 or opts.steps < 1 or opts.burn_in < 0:
        raise UserError("--rounds and --steps must be >= 1 and --burn_in >= 0")
    times: dict[str, list[float]] = {"decoder": [], "encoder": []}
    results = {}
    for _ in range(opts.rounds):
        for arch in times:
            results[arch] = measure([*train_argv, f"--arch={arch}"], burn_in=opts.burn_in, steps=opts.steps)
            times[arch].append(results[arch]["ms_per_iter"])
    ms = {arch: statistics.median(t) for arch, t in times.items()}
    for arch, r in results.items():
        print(
            f"{arch}: {r['params'] / 1e6:.2f}M params, {r['tokens_per_iter']:,} tokens/iter: {ms[arch]:.1f} ms/iter "
            f"(median of {opts.rounds}: {', '.join(f'{t:.1f}' for t in times[arch])})"
        )
    flops = results["encoder"]["flops_per_iter"] / results["decoder"]["flops_per_iter"]
    print(f"encoder / decoder: time {ms['encoder'] / ms['decoder']:.3f}, FLOPs (PaLM count) {flops:.3f}")


if __name__ == "__main__":
    run_cli(main)
