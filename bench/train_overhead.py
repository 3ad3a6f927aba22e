"""What train.py costs beyond the step itself: its per-iteration time next to a bare loop over the same model, in the
same run, and optionally next to nanoGPT's own train.py on the same flags.

    python bench/train_overhead.py --data_root=/tmp/data                     # nanoGPT's README CPU recipe, 600 iters
    python bench/train_overhead.py --data_root=/tmp/data --nanogpt=/path/to/nanoGPT

The flags are nanoGPT's README CPU recipe on config/train_shakespeare_char.py (4 layers, 128 wide, T=64, batch 12,
600 iterations, no compile); data_root must hold shakespeare_char prepared by prepare/shakespeare_char.py, and a
nanoGPT checkout its own data/shakespeare_char. It prints the median iteration time of each (train.py's from its
metrics.jsonl, nanoGPT's from its log lines), the whole process's wall time for the two train.py runs, and ratios.
The machine should be otherwise idle; run it twice and believe what repeats.

train.py and the bare loop run in train.py's dtype=auto: bf16 on CPUs with AMX, float32 elsewhere; nanoGPT trains in
float32 on every CPU. --dtype=float32 compares the two at nanoGPT's precision.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

from bench.train_speed import measure
from engine.configurator import parse_config
from engine.errors import run_cli

RECIPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=600",
    "--lr_decay_iters=600",
    "--dropout=0.0",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO_TIME = re.compile(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms")


def ours(data_root: str, dtype: str) -> tuple[float, float]:
    """(median ms per iteration, wall seconds) of `python train.py <recipe>` in a fresh process."""
    out = tempfile.mkdtemp(prefix="overhead-")
    t0 = time.time()
    cmd = [sys.executable, "train.py", *RECIPE, f"--data_root={data_root}", f"--out_dir={out}", f"--dtype={dtype}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    wall = time.time() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        dts = [r["dt"] for r in map(json.loads, f) if "dt" in r and r["iter"] >= 5]
    return statistics.median(dts) * 1000, wall


def nanogpt(path: str) -> tuple[float, float]:
    out = tempfile.mkdtemp(prefix="overhead-nano-")
    t0 = time.time()
    cmd = [sys.executable, "train.py", *RECIPE, f"--out_dir={out}"]
    proc = subprocess.run(cmd, cwd=path, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    times = [float(m.group(1)) for m in map(NANO_TIME.match, proc.stdout.splitlines()) if m]
    return statistics.median(times[5:]), wall


@dataclass
class OverheadConfig:
    data_root: str = "data"  # holds shakespeare_char/ (prepare/shakespeare_char.py)
    nanogpt: str | None = None  # a nanoGPT checkout with data/shakespeare_char prepared
    dtype: str = "auto"  # train.py's and the bare loop's (nanoGPT's own is float32 on CPUs)


def main(argv=None):
    args = parse_config(OverheadConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    recipe = [*RECIPE, "--vocab_size=128", f"--dtype={args.dtype}"]  # 65 chars rounded up, as train.py does
    bare = measure(recipe, burn_in=20, steps=100)["ms_per_iter"]
    ms, wall = ours(args.data_root, args.dtype)
    print(f"bare loop (same model, random tokens): {bare:.2f} ms/iter")
    print(f"train.py: {ms:.2f} ms/iter (median), {wall:.1f} s wall; x{ms / bare:.2f} of the bare loop")
    if args.nanogpt:
        nano_ms, nano_wall = nanogpt(args.nanogpt)
        print(f"nanoGPT train.py: {nano_ms:.2f} ms/iter (median), {nano_wall:.1f} s wall")
        print(f"train.py / nanoGPT: x{ms / nano_ms:.2f} per iteration, x{wall / nano_wall:.2f} wall")


if __name__ == "__main__":
    run_cli(main)
