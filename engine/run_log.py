"""The run log: one record (a dict) per event makes nanoGPT's console line, a metrics.jsonl row (on the master) and a
wandb point (with --wandb_log), and an evaluation redraws loss_curve.png on another thread. StepTimer gives the step
times and the ETA.

metrics.jsonl holds each iteration once: a resumed run first drops the rows logged after the checkpoint it resumes
(it logs them again), keeping the rows of the rollbacks that checkpoint's state already counts; a new run starts it
empty. Rows are appended whole or not at all, never through a symlink, and a full disk costs rows (said once), not
the run.
"""

import dataclasses
import errno
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from engine import health
from engine.checkpoint import read_meta
from engine.configurator import format_config
from engine.errors import UserError
from engine.files import open_nofollow, write_file
from engine.loss_curve import BackgroundPlot


@dataclass
class StepTimer:
    """Wall time per step. Steps after the first `warmup` (compilation, allocator warm-up) give the mean step time
    the ETA extrapolates; with a peak FLOP/s known, steps after the first mfu_warmup give the MFU."""

    warmup: int
    peak: float | None = None  # the device's peak FLOP/s; None: unknown, no MFU
    mfu_warmup: int = 5
    t0: float = dataclasses.field(default_factory=time.time)
    steps: int = 0  # steps this process has run
    timed: float = 0.0  # seconds of the steps after warm-up
    timed_steps: float = 0.0  # full batches' worth

    def restart(self) -> None:
        self.t0 = time.time()

    def lap(self, share: float, tokens: int, flops: float, steps_left: float) -> dict:
        """Time the step since the last lap (or restart), one of `share` full batches that trained `tokens` with
        `flops` per GPU, and return its record's timing: dt, tokens_per_sec, eta_s (for steps_left full batches at
        the mean pace so far) and mfu."""
        t1 = time.time()
        dt, self.t0 = t1 - self.t0, t1
        self.steps += 1
        if self.steps > self.warmup:
            self.timed, self.timed_steps = self.timed + dt, self.timed_steps + share
        eta = steps_left * self.timed / self.timed_steps if self.timed_steps else None
        timing = {"dt": dt, "tokens_per_sec": tokens / dt, "eta_s": eta}
        return timing | ({"mfu": flops / dt / self.peak} if self.peak and self.steps > self.mfu_warmup else {})


class RunLog:
    """Where a record goes: the console (nanoGPT's `iter` and `step` lines), and on the master metrics.jsonl, wandb
    and the loss curve (redrawn after each evaluation, on another thread). One dict makes all of them."""

    WANDB_NAMES = {"loss": "train/loss_step", "train_loss": "train/loss", "val_loss": "val/loss"}  # nanoGPT's names

    def __init__(self, out_dir: str, rt, planned_iters: int, config: dict, resume_from: str | None, wandb_run=None):
        """config: the run's resolved options (written to out_dir/train_config.py as a preset, and given to wandb);
        resume_from: the checkpoint the run resumes, or None for a new run; wandb_run: (project, run name) to log to
        wandb, or None."""
        self.rt, self.max_iters = rt, planned_iters  # max_iters, or more steps with batch warmup
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plotter = BackgroundPlot(out_dir)
        self.metrics_lost = False  # a row could not be written (full disk): warned once
        self.wandb = None
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            # rows past the checkpoint are logged again; a new run's file starts empty (rows there are of a run that
            # died before its first checkpoint)
            resumed = read_meta(resume_from) if resume_from else {}
            trim_metrics(self.metrics_path, resumed.get("iter_num", 0), resumed.get("rollbacks", 0))
            header = "# resolved config of the last run in this directory"
            write_file(os.path.join(out_dir, "train_config.py"), f"{header}\n{format_config(config)}\n")
        if wandb_run and rt.master:  # imported only when asked for, on the master only
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_log=True needs wandb: pip install wandb (or drop --wandb_log)") from None
            wandb.init(project=wandb_run[0], name=wandb_run[1], config=config)
            self.wandb = wandb

    def __call__(self, record: dict) -> None:
        self.rt.print0(console_line(record, self.max_iters))
        if not self.rt.master:
            return
        try:
            log_metrics(self.metrics_path, record)
        except OSError as e:  # a full disk: the run goes on (its checkpoints say the same), said once
            if not self.metrics_lost:
                print(f"warning: cannot write {self.metrics_path} ({e.strerror}); training goes on", file=sys.stderr)
            self.metrics_lost = True
        if "val_loss" in record or "task_items" in record:
            self.plotter.refresh()  # out_dir/loss_curve.png
        if self.wandb:
            point = {self.WANDB_NAMES.get(k, k): v for k, v in record.items() if not isinstance(v, (list, type(None)))}
            for name in (k for k, v in record.items() if isinstance(v, list) and k in health.QUANTITIES):
                point |= {f"health/{name}/layer_{i}": v for i, v in enumerate(record[name])}  # grouped per layer
            self.wandb.log(point)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """However the run ends, the plot thread and wandb finish before out_dir is let go (a second Ctrl-C interrupts
        the wait); wandb records a run that failed or was interrupted as such, not as finished."""
        self.close(exit_code=0 if kind is None else 130 if issubclass(kind, KeyboardInterrupt) else 1)

    def close(self, exit_code: int = 0) -> None:
        self.plotter.join()
        if self.wandb:
            self.wandb.finish(exit_code=exit_code)


def console_line(record: dict, max_iters: int) -> str:
    """nanoGPT's lines: `step N: train loss X, val loss Y` for an evaluation, and for a step
    `iter N/max (P%): loss X, time Y ms, T tok/s` with the ETA, MFU and MoE aux loss when known."""
    if "val_loss" in record:
        line = f"step {record['iter']}: train loss {loss_text(record['train_loss'])}, val loss "
        line += loss_text(record["val_loss"])
        if "val_accuracy" in record:  # an encoder's: the share of masked tokens (or labels) predicted right
            accuracy = [
                f"{record[f'{s}_accuracy']:.4f}" if record[f"{s}_accuracy"] is not None else "n/a"
                for s in ("train", "val")
            ]
            line += f" (accuracy: train {accuracy[0]}, val {accuracy[1]})"
        if "val_loss_ema" in record:
            train_ema, val_ema = loss_text(record["train_loss_ema"]), loss_text(record["val_loss_ema"])
            line += f" (EMA weights: train loss {train_ema}, val loss {val_ema})"
        return line
    if "act_rms" in record:
        return health.summary(record)
    if "rollback" in record:
        return (
            f"iter {record['iter']}: loss spike (loss {record['spike_loss']:.4f}): rolled back to {record['to']} "
            f"(iteration {record['to_iter']}), learning rate x{record['lr_scale']:g}, new data windows "
            f"(rollback {record['rollback']} of at most {record['of']})"
        )
    if "task_items" in record:
        name = next(k for k in record if k.endswith("_acc")).removesuffix("_acc")
        acc, norm = record[f"{name}_acc"], record[f"{name}_acc_norm"]
        return f"step {record['iter']}: {name} acc {acc:.4f}, acc_norm {norm:.4f} ({record['task_items']:,} items)"
    it = record["iter"]
    line = (
        f"iter {it}/{max_iters} ({100 * it / max(1, max_iters):.0f}%): loss {loss_text(record['loss'])}, "
        f"time {record['dt'] * 1000:.2f}ms, {record['tokens_per_sec']:,.0f} tok/s"
    )
    if record.get("eta_s") is not None:
        line += f", eta {format_duration(record['eta_s'])}"
    if "mfu" in record:
        line += f", mfu {record['mfu'] * 100:.2f}%"
    if "aux_loss" in record:
        line += f", aux loss {record['aux_loss']:.4f}"
    return line


def loss_text(loss: float | None) -> str:
    """A loss to 4 decimals, or n/a for a batch or evaluation with no target to score (chat data)."""
    return "n/a (no assistant tokens)" if loss is None else f"{loss:.4f}"


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_metrics(path: str, record: dict) -> None:
    """Append one JSON line, whole or not at all: one write() of the line, cut back off again if it failed part-way
    (a full disk), so the file never holds a torn line that the next append would glue onto."""
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()})
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the run's metrics")
    try:
        size = os.fstat(fd).st_size
        data = (line + "\n").encode()
        try:
            if os.write(fd, data) != len(data):  # a short write: the disk filled up part-way
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _kept(line: str, iter_num: int, rollbacks: int) -> bool:
    """Whether trim_metrics keeps this row: before iter_num, or one of the first `rollbacks` rollbacks' rows. A line
    that is not a row of ours is dropped."""
    try:
        row = json.loads(line)
        return row.get("iter", -1) < iter_num or row.get("rollback") in range(1, rollbacks + 1)
    except (ValueError, AttributeError, TypeError):
        return False


def trim_metrics(path: str, iter_num: int, rollbacks: int = 0) -> None:
    """Drop the rows at or past iteration iter_num (logged by the run after the checkpoint it resumes from, which
    the resumed run logs again), so every iteration appears once; the rows of the `rollbacks` rollbacks the
    checkpoint's state already counts stay (they explain its learning rate and data windows)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _kept(line, iter_num, rollbacks)]
    if len(kept) != len(lines):
        write_file(path, "".join(kept), kept="the untrimmed file")


def size_report(model, tokens_per_iter: int, block_size: int, max_iters: int) -> str:
    """Two lines for train.py's start-up: parameters, tokens and FLOPs per iteration, and the data budget against
    Chinchilla's 20 tokens per parameter (Hoffmann et al. 2022). tools/sizing.py has the whole picture before a run."""
    n = model.num_params(non_embedding=False)
    flops_per_iter = model.flops_per_token(block_size) * tokens_per_iter
    planned = max_iters * tokens_per_iter
    return (
        f"sizing: {n:,} parameters, {tokens_per_iter:,} tokens/iter, {flops_per_iter:.3g} FLOPs/iter (6N + 12LCT)\n"
        f"sizing: {planned:,} tokens planned = {planned / n:.1f} per parameter (Chinchilla-optimal: 20)"
    )
