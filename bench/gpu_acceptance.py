"""The GPU acceptance check: one command that measures the whole GPU story on one CUDA GPU and prints one table.

    python bench/gpu_acceptance.py                  # on a CUDA machine; about 6 minutes with the compiles
    python bench/gpu_acceptance.py --smoke=True     # tiny shapes on any device: checks the script itself runs

What it measures (targets in brackets; nanoGPT's own figure on an H100 is 470k tok/s at batch 32):
  1. training GPT-2 124M, T=1024, bf16, torch.compile: batch 12 and 32, ms/iter, tok/s, per-GPU MFU, peak memory;
     batch 32 again with gradient checkpointing (its memory and time against the plain run); GPT-2 XL (1.5B) peak
     memory at batch 8 with checkpointing.                                   [tok/s >= 1.4x nanoGPT's]
  2. decoding GPT-2 124M shapes (random weights), batch 1 and 8, 500 new tokens, compiled, in bf16: tok/s, and
     whether the greedy tokens equal eager decoding's.                       [>= 4,000 tok/s at batch 1]
  3. config/train_shakespeare_char.py: seconds from process start to the first val loss <= 1.47, with
     data/shakespeare_char/ prepared first (its input.txt is downloaded, or copied there beforehand offline).
                                                                             [<= 15 s]
Without CUDA (and without --smoke=True) it says so in one line and exits 0.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import torch

from bench.train_speed import measure
from engine.configurator import parse_config
from engine.errors import run_cli
from engine.generate import Decoder, Sampling
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = ["config/train_gpt2.py", "--gradient_accumulation_steps=1", "--dtype=bfloat16", "--compile=True"]
XL = ["--n_layer=48", "--n_head=25", "--n_embd=1600"]
VAL_LINE = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def training_rows(smoke: bool) -> list[tuple[str, dict]]:
    base = GPT2 if not smoke else ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--compile=False"]
    base = base if not smoke else [*base, "--gradient_accumulation_steps=1", "--vocab_size=64"]
    steps = {"burn_in": 10, "steps": 20} if not smoke else {"burn_in": 1, "steps": 2}
    rows = []
    for batch in (12, 32) if not smoke else (2, 4):
        rows.append((f"train 124M, batch {batch}", measure([*base, f"--batch_size={batch}"], **steps)))
    batch = 32 if not smoke else 4
    rows.append(
        (
            f"train 124M, batch {batch}, checkpointing",
            measure([*base, f"--batch_size={batch}", "--gradient_checkpointing=True"], **steps),
        )
    )
    xl = [*base, *XL] if not smoke else [*base, "--n_layer=4"]
    rows.append(
        (
            "train 1.5B (XL), batch 8, checkpointing",
            measure([*xl, "--batch_size=8", "--gradient_checkpointing=True"], burn_in=2, steps=3),
        )
    )
    return rows


def decoding_rows(device: str, smoke: bool) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304) if not smoke else GPTConfig(64, 64, 2, 2, 32)
    model = GPT(config).to(device, torch.bfloat16).eval()
    new_tokens = 500 if not smoke else 20
    greedy = Sampling(temperature=0)
    rows = []
    for batch in (1, 8):
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
        eager = torch.cat(list(Decoder(model).generate(prompt, new_tokens, greedy)), dim=1)
        decoder = Decoder(model, compile=True)
        for _ in range(2):  # the first call compiles (and captures the CUDA graph); the second is timed
            sync(device)
            t0 = time.perf_counter()
            tokens = torch.cat(list(decoder.generate(prompt, new_tokens, greedy)), dim=1)
            sync(device)
            dt = time.perf_counter() - t0
        differ = (tokens != eager).any(dim=0).nonzero()
        same = "equal to eager" if not len(differ) else f"differs from eager from token {differ[0].item()}"
        rows.append((f"decode 124M, batch {batch}", f"{batch * new_tokens / dt:,.0f} tok/s, greedy {same}"))
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def char_run(smoke: bool, limit_s: float) -> str:
    """Prepare shakespeare_char, then train with nanoGPT's preset until the first val loss <= 1.47."""
    t0 = time.time()
    prep = subprocess.run([sys.executable, "prepare/shakespeare_char.py"], cwd=ROOT, capture_output=True, text=True)
    if prep.returncode != 0:
        return f"not run: prepare failed ({prep.stderr.strip().splitlines()[-1][:200] if prep.stderr else '?'})"
    prepared = time.time() - t0
    out_dir = tempfile.mkdtemp(prefix="acceptance-char-")  # a fresh run every time
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--out_dir={out_dir}"]
    if smoke:
        cmd += ["--device=cpu", "--compile=False", "--n_layer=1", "--n_embd=48", "--n_head=2", "--batch_size=4"]
        cmd += ["--block_size=32", "--eval_iters=2", "--eval_interval=2", "--max_iters=4"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reached, last = None, "no evaluation"
    try:
        for line in proc.stdout:
            m = VAL_LINE.match(line)
            if m:
                last = f"val {m.group(2)} at step {m.group(1)}"
                if float(m.group(2)) <= (1.47 if not smoke else 99.0):
                    reached = time.time() - t0
                    break
            if time.time() - t0 > limit_s:
                break
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
    if reached is None:
        return f"val <= 1.47 not reached within {limit_s:.0f} s ({last})"
    return f"val <= 1.47 after {reached:.1f} s from process start ({last}; prepare took {prepared:.1f} s before)"


@dataclass
class AcceptanceConfig:
    smoke: bool = False  # tiny shapes on any device, to check the script runs
    char_limit_s: float = 120.0  # give up on the char run after this long
    skip_char: bool = False  # leave out the shakespeare_char run


def main(argv=None):
    args = parse_config(AcceptanceConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_acceptance: no CUDA GPU on this machine; nothing measured (run it on one, or use --smoke=True)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(f"# GPU acceptance on {name}, torch {torch.__version__}")
    table = []
    results = training_rows(args.smoke)
    for label, r in results:
        cells = [f"{r['ms_per_iter']:.1f} ms/iter", f"{r['tokens_per_sec']:,.0f} tok/s"]
        cells.append(f"MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "MFU n/a")
        if r["peak_memory_gib"] is not None:
            cells.append(f"peak {r['peak_memory_gib']:.2f} GiB")
        table.append((label, ", ".join(cells)))
    plain, ckpt = results[1][1], results[2][1]
    ratio = f"time x{ckpt['ms_per_iter'] / plain['ms_per_iter']:.2f}"
    if plain["peak_memory_gib"]:
        ratio += f", memory x{ckpt['peak_memory_gib'] / plain['peak_memory_gib']:.2f}"
    table.append(("checkpointing vs plain (same batch)", ratio))
    table += decoding_rows(device, args.smoke)
    if not args.skip_char:
        table.append(("shakespeare_char to val 1.47", char_run(args.smoke, args.char_limit_s)))
    width = max(len(label) for label, _ in table)
    for label, text in table:
        print(f"{label:<{width}}  {text}")
    return 0


if __name__ == "__main__":
    run_cli(main)
