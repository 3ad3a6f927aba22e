"""Training throughput, like nanoGPT's bench.py: ms/iter, tokens/s, MFU against the device's real peak, peak memory.

    python bench/train_speed.py config/train_gpt2.py --batch_size=12 --gradient_accumulation_steps=1  # GPT-2 124M
    python bench/train_speed.py config/train_gpt2.py --batch_size=32 --gradient_checkpointing=True
    python bench/train_speed.py config/train_shakespeare_char_cpu.py --device=cpu --compile=False

Takes every train.py option (presets and --key=value, resolved by train.py itself: engine/configurator.py
resolve_options). Synthetic data (uniform random tokens, so no data files are
needed), burn-in steps, then timed steps with the device synchronised at both ends. One process; the step is
train.py's: forward and backward under autocast, gradient clipping, the optimizer(s).
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import torch

from engine.configurator import PRINT_CONFIG, resolve_options
from engine.data import dataset_vocab_size
from engine.errors import UserError, run_cli
from engine.masking import token_ids_needed
from engine.optim import setup_training
from engine.runtime import peak_flops, seed_everything, setup_runtime, trace_data_dependent_shapes
from model import GPT, GPTConfig

TRAIN_PY = os.path.join(ROOT, "train.py")  # whose command line and step this measures


def measure(argv: list[str], burn_in: int = 10, steps: int = 20) -> dict:
    """Time train.py's step for the config named by argv: ms_per_iter, tokens_per_sec, mfu (None without a known
    peak), peak_memory_gib (None off CUDA), params (non-embedding), tokens_per_iter."""
    cfg = resolve_options(TRAIN_PY, argv)
    rt = setup_runtime(cfg.device, cfg.dtype, training=True)
    seed_everything(cfg.seed)
    # the model train.py would build: the dataset's vocabulary (rounded up to 64) unless the config sets one
    try:
        vocab_size = cfg.vocab_size or dataset_vocab_size(os.path.join(cfg.data_root, cfg.dataset))
    except UserError:
        vocab_size = 50304
        print(f"note: {cfg.data_root}/{cfg.dataset} is not prepared here; measuring GPT-2's vocabulary ({vocab_size})")
    model = GPT(GPTConfig.from_options(vars(cfg), token_ids_needed(vocab_size, cfg.arch), pad_id=0)).to(rt.device)
    optimizers = setup_training(
        model,
        cfg.optimizer,
        cfg.weight_decay,
        cfg.learning_rate,
        (cfg.beta1, cfg.beta2),
        rt.device_type,
        cfg.muon_learning_rate,
        recompute_every=cfg.recompute_every if cfg.gradient_checkpointing else 0,
    )
    if cfg.compile:
        trace_data_dependent_shapes()  # as train.py: MoE routing compiles without a graph break
    fwd = torch.compile(model) if cfg.compile else model
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    data = torch.randint(
        model.config.vocab_size,
        (burn_in + steps, cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size + 1),
        device=rt.device,
    )

    def step(i):
        for micro in range(cfg.gradient_accumulation_steps):
            xy = data[i, micro]
            with rt.autocast():
                loss = fwd(xy[:, :-1], xy[:, 1:])[1]
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if rt.device_type == "cuda":
            torch.cuda.synchronize()

    for i in range(burn_in):
        step(i)
    sync()
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(burn_in, burn_in + steps):
        loss = step(i)
    loss.item()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = peak_flops(rt, cfg.peak_flops)
    return {
        "params": model.num_params(),
        "tokens_per_iter": tokens,
        "ms_per_iter": dt * 1000,
        "tokens_per_sec": tokens / dt,
        "flops_per_iter": model.flops_per_token(cfg.block_size) * tokens,
        "mfu": model.flops_per_token(cfg.block_size) * tokens / dt / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if rt.device_type == "cuda" else None,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\noptions: every train.py option (python train.py --help)")
        return
    if PRINT_CONFIG in argv:  # the options that would be measured
        print(json.dumps(vars(resolve_options(TRAIN_PY, argv))))
        return
    r = measure(argv)
    line = (
        f"{r['params'] / 1e6:.1f}M params, {r['tokens_per_iter']:,} tokens/iter: {r['ms_per_iter']:.1f} ms/iter, "
        f"{r['tokens_per_sec']:,.0f} tokens/s"
    )
    if r["mfu"] is not None:
        line += f", MFU {r['mfu'] * 100:.1f}%"
    if r["peak_memory_gib"] is not None:
        line += f", peak memory {r['peak_memory_gib']:.2f} GiB"
    print(line)


if __name__ == "__main__":
    run_cli(main)
