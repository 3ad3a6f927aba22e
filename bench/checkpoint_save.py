"""Sharded checkpoints under FSDP, on CPU with gloo: rank 0's peak memory during a save, sharded (every rank writes
its own shards, engine/sharded_checkpoint.py) vs gathered (the whole model and optimizer state gathered on rank 0
and written as one file, as FSDP runs saved before), and the training stall per save, asynchronous vs synchronous.

    python bench/checkpoint_save.py                             # 4 processes, a 51M-parameter model
    python bench/checkpoint_save.py --processes=2 --n_layer=4 --steps=8

Each measurement is a fresh `torchrun --nproc_per_node=<processes>` job on this machine, training the same FSDP model
with AdamW (weights + 2 moments: the full state is 3 x 4 bytes a parameter, each rank holding 1/processes of it):
- memory: rank 0's resident memory sampled every millisecond during one save, its peak above the level before it;
- stall: `steps` training steps with a checkpoint every `save_every`: per save, the time training is blocked inside
  the save (and, at the end, waiting for the last one), and how much slower the run is than the same steps without
  checkpoints (here the background writer shares the CPU cores with training, so this includes its slowing of the
  steps around it; on GPUs training does not compete with the writer).
Checkpoints go through train.py's own TrainState.save (and, for the gathered baseline, engine/checkpoint.py's
one-file writer), into a temporary directory removed afterwards.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import torch

from engine.configurator import parse_config
from engine.errors import run_cli

MODES = ("gather", "sharded", "sharded_async", "none", "sync", "async")


@dataclass
class CheckpointSaveConfig:
    processes: int = 4  # torchrun processes (gloo, CPU)
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    vocab_size: int = 50304  # GPT-2's, padded
    block_size: int = 64
    batch_size: int = 1  # sequences per step and process
    steps: int = 12  # training steps for the stall figures
    save_every: int = 4  # a checkpoint every this many of them
    mode: str = ""  # (set by the launcher for each job: one of MODES)

    def __post_init__(self):
        if min(self.processes, self.steps, self.save_every) < 1:
            raise ValueError("processes, steps and save_every must be >= 1")
        if self.mode not in ("", *MODES):
            raise ValueError(f"mode must be one of {', '.join(MODES)}")


class PeakMemory:
    """Resident memory of this process sampled every millisecond inside the block: .peak above .start, in bytes."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(cfg: CheckpointSaveConfig) -> dict:
    """One rank of one job: build, shard and step the model, then measure cfg.mode; rank 0 returns the figures."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from engine.checkpoint import save_checkpoint
    from engine.fsdp import shard_model
    from engine.optim import setup_training
    from engine.runtime import seed_everything, setup_runtime, teardown_runtime
    from engine.train_state import TrainState
    from model import GPT, GPTConfig

    rt = setup_runtime("cpu", "float32", training=True)
    seed_everything(1337)
    config = GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    shard_model(model, rt)
    optimizers = setup_training(model, "adamw", 0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))

    def step():
        model(x, x)[1].backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # the optimizer's moments exist from here on
    out_dir = tempfile.mkdtemp(prefix="checkpoint_save-") if rt.master else None
    where = [out_dir]
    torch.distributed.broadcast_object_list(where, src=0)
    meta = {"train_config": {}, "data": {}}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    asynchronous = cfg.mode in ("async", "sharded_async")
    state = TrainState(model, optimizers, scaler, None, None, rt, True, where[0], 1, meta, asynchronous)
    figures = {"mode": cfg.mode, "params": params, "full_state_bytes": 3 * 4 * params}
    if cfg.mode == "gather":  # the whole state on rank 0, one file
        with PeakMemory() as memory:
            whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=whole)
            moments = [get_optimizer_state_dict(model, opt, options=whole) for opt in optimizers]
            if rt.master:
                save_checkpoint(where[0], 1, weights, {"optimizers": moments, "scaler": {}}, meta)
            del weights, moments
        figures["rank0_peak_bytes"] = memory.peak
    elif cfg.mode.startswith("sharded"):  # synchronous: written from the tensors; asynchronous: from a copy
        with PeakMemory() as memory:
            state.loop.iter_num = 1
            state.save(None)
            state.finish_saving()
        figures["rank0_peak_bytes"] = memory.peak
    else:  # the stall: the same steps with a checkpoint every save_every, synchronous or not, or none
        torch.distributed.barrier()
        t0, blocked = time.perf_counter(), 0.0
        for i in range(1, cfg.steps + 1):
            step()
            state.loop.iter_num = i
            if cfg.mode != "none" and i % cfg.save_every == 0:
                t = time.perf_counter()
                state.save(None)  # (asynchronous: waits for the previous save, copies, starts the writer)
                blocked += time.perf_counter() - t
        t = time.perf_counter()
        state.finish_saving()  # a run's end waits for its last checkpoint
        torch.distributed.barrier()
        figures["seconds"], figures["blocked_seconds"] = time.perf_counter() - t0, blocked + time.perf_counter() - t
        figures["saves"] = cfg.steps // cfg.save_every if cfg.mode != "none" else 0
    torch.distributed.barrier()
    if rt.master:
        import shutil

        shutil.rmtree(where[0], ignore_errors=True)
    teardown_runtime(rt)
    return figures


def launch(cfg: CheckpointSaveConfig, mode: str) -> dict:
    """cfg's figures for `mode`, from a fresh torchrun job of this script."""
    argv = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "mode"]
    argv.append(f"--mode={mode}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.processes}"]
    env = {k: v for k, v in os.environ.items() if k != "RANK"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, os.path.abspath(__file__), *argv], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {mode} job failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    cfg = parse_config(CheckpointSaveConfig, argv, usage=__doc__)
    if "RANK" in os.environ:  # one rank of a job
        figures = worker(cfg)
        if figures and int(os.environ["RANK"]) == 0:
            print(json.dumps(figures), flush=True)
        return 0
    mib = 1 << 20
    gather, sharded, staged = launch(cfg, "gather"), launch(cfg, "sharded"), launch(cfg, "sharded_async")
    full = gather["full_state_bytes"]
    print(
        f"model: {gather['params'] / 1e6:.1f}M parameters; weights + AdamW moments {full / mib:.0f} MiB in all, "
        f"{full / cfg.processes / mib:.0f} MiB a rank over {cfg.processes} processes"
    )
    print(f"rank 0 peak memory during a save, gathered (one file):  {gather['rank0_peak_bytes'] / mib:8.0f} MiB")
    print(f"rank 0 peak memory during a save, sharded (DCP):        {sharded['rank0_peak_bytes'] / mib:8.0f} MiB")
    print(f"rank 0 peak memory, sharded and asynchronous (a copy):  {staged['rank0_peak_bytes'] / mib:8.0f} MiB")
    print(f"  ratio gathered / sharded: {gather['rank0_peak_bytes'] / max(sharded['rank0_peak_bytes'], 1):.1f}x")
    runs = {mode: launch(cfg, mode) for mode in ("none", "sync", "async")}
    base = runs["none"]["seconds"]
    print(f"{cfg.steps} steps without checkpoints: {base:.2f} s")
    for mode in ("sync", "async"):
        run = runs[mode]
        stall, blocked = (run["seconds"] - base) / run["saves"], run["blocked_seconds"] / run["saves"]
        print(
            f"{cfg.steps} steps, {run['saves']} {mode} saves: {run['seconds']:.2f} s; per save: training blocked "
            f"{blocked:.2f} s, the run slower by {stall:.2f} s"
        )
    print(json.dumps({"gather": gather, "sharded": sharded, "sharded_async": staged, **runs}))
    return 0


if __name__ == "__main__":
    run_cli(main)
