"""Loss curves drawn from metrics.jsonl: the drawing behind tools/plot.py, and the loss_curve.png that train.py
refreshes in out_dir at every evaluation (BackgroundPlot, on a worker thread).

Each run draws its training loss at every logged iteration (thin, light), its evaluated train and val losses
(markers), and its learning rate on the right-hand axis. When every run's train_config.py gives the same tokens per
iteration (gradient_accumulation_steps * batch_size * block_size), a top axis shows tokens seen.

matplotlib is imported only when a plot is drawn, through Figure objects rather than pyplot (no display needed, no
global state).
"""

import ast
import dataclasses
import json
import math
import os
import sys
import threading
from dataclasses import dataclass

from engine.files import replacing

FIGSIZE = (10.0, 6.0)  # inches
DPI = 100  # so a plot is 1000 x 600 pixels


@dataclass
class Metrics:
    """One run's metrics.jsonl, split into its two kinds of record."""

    iters: list[int]  # logged training iterations
    loss: list[float]  # training loss (mean over the global batch) at each of them
    lr: list[float]
    eval_iters: list[int]  # evaluations
    train_loss: list[float]
    val_loss: list[float]
    task_iters: list[int] = dataclasses.field(default_factory=list)  # benchmark scores (train.py --eval_task)
    task_acc: list[float] = dataclasses.field(default_factory=list)  # acc_norm
    task: str | None = None
    rollbacks: list[int] = dataclasses.field(default_factory=list)  # iterations where a loss spike was rolled back


def read_metrics(path: str) -> Metrics:
    """Parse metrics.jsonl; non-finite values (written as null) and torn last lines are skipped."""
    m = Metrics([], [], [], [], [], [])
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if "rollback" in r:
                m.rollbacks.append(r["iter"])
            elif "task_items" in r:
                m.task = next((k.removesuffix("_acc_norm") for k in r if k.endswith("_acc_norm")), m.task)
                if m.task and r.get(f"{m.task}_acc_norm") is not None:
                    m.task_iters.append(r["iter"])
                    m.task_acc.append(r[f"{m.task}_acc_norm"])
            elif "val_loss" in r and r.get("train_loss") is not None and r.get("val_loss") is not None:
                m.eval_iters.append(r["iter"])
                m.train_loss.append(r["train_loss"])
                m.val_loss.append(r["val_loss"])
            elif "loss" in r and r["loss"] is not None:
                m.iters.append(r["iter"])
                m.loss.append(r["loss"])
                m.lr.append(r.get("lr", math.nan))
    return m


def tokens_per_iter(run_dir: str) -> int | None:
    """gradient_accumulation_steps * batch_size * block_size from run_dir/train_config.py, or None (also for a run
    with batch warmup, whose iterations vary in size). The file is parsed as `key = literal` lines, never executed."""
    try:
        with open(os.path.join(run_dir, "train_config.py")) as f:
            tree = ast.parse(f.read())
        values = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        }
        if values.get("batch_warmup_tokens"):
            return None
        return values["gradient_accumulation_steps"] * values["batch_size"] * values["block_size"]
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None


def metrics_path(run: str) -> str:
    """A run directory or a metrics.jsonl path -> the metrics.jsonl path."""
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def plot_runs(metrics_paths: list[str], out_png: str, labels: list[str] | None = None, title: str | None = None):
    """Draw the runs' losses and learning rates against iteration into out_png (written atomically)."""
    from matplotlib.figure import Figure  # lazily: training without matplotlib still works
    from matplotlib.ticker import EngFormatter, FuncFormatter

    paths = [metrics_path(p) for p in metrics_paths]
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    runs = [read_metrics(p) for p in paths]
    scored = [m for m in runs if m.task_iters]
    if scored:  # a second panel for the benchmark accuracy: loss above, accuracy below
        ax, ax_task = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
        ax_task.set_ylabel(f"{scored[0].task} acc_norm")
        ax_task.grid(alpha=0.3)
    else:
        ax = fig.subplots()
    ax_lr = ax.twinx()
    tokens = set()
    for i, (path, label, m) in enumerate(zip(paths, labels, runs, strict=True)):
        color = f"C{i}"
        for k, it in enumerate(m.rollbacks):  # a marker where a loss spike was rolled back
            ax.axvline(it, color=color, linestyle="--", alpha=0.5, label=f"{label} rollback" if k == 0 else None)
        if m.task_iters:
            ax_task.plot(m.task_iters, m.task_acc, "D-", color=color, markersize=4, label=f"{label} {m.task}")
        ax.plot(m.iters, m.loss, color=color, alpha=0.3, linewidth=0.8, label=f"{label} train (per iteration)")
        ax.plot(m.eval_iters, m.train_loss, "o-", color=color, markersize=4, label=f"{label} train (eval)")
        ax.plot(m.eval_iters, m.val_loss, "s--", color=color, markersize=4, label=f"{label} val (eval)")
        ax_lr.plot(m.iters, m.lr, ":", color=color, alpha=0.7, linewidth=1)
        tokens.add(tokens_per_iter(os.path.dirname(path)))
    (ax_task if scored else ax).set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax_lr.set_ylabel("learning rate (dotted)")
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}"))
    if len(tokens) == 1 and None not in tokens:  # a tokens axis only when it means the same for every run
        tpi = tokens.pop()
        top = ax.secondary_xaxis("top", functions=(lambda it: it * tpi, lambda tok: tok / tpi))
        top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M, 3G
        top.set_xlabel(f"tokens seen ({tpi:,} per iteration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or " vs ".join(labels), fontsize=10)
    save_png(fig, out_png)


def save_png(fig, out_png: str) -> None:
    """Write the figure to out_png whole (a viewer never sees half a PNG), never through a symlink."""
    with replacing(out_png) as f:
        fig.savefig(f, format="png")


def refresh_loss_curve(out_dir: str) -> str | None:
    """Rewrite out_dir/loss_curve.png from out_dir/metrics.jsonl; returns its path, or None when it could not be
    drawn (no metrics yet, matplotlib missing or failing). Never raises: a plot must not stop a training run."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    out_png = os.path.join(out_dir, "loss_curve.png")
    try:
        plot_runs([path], out_png)
    except ImportError:
        return None  # matplotlib is optional for training
    except Exception as e:  # any plotting problem: say so and carry on training
        print(f"warning: loss curve not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return out_png


class BackgroundPlot:
    """Redraws out_dir/loss_curve.png on a worker thread, so drawing never stalls a training step. A refresh asked
    for while one is drawing runs right after it (one worker at a time: matplotlib is not thread-safe); join() waits
    for the last one."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._lock = threading.Lock()
        self._wanted = False
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        with self._lock:
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="loss-curve", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._wanted:
                    self._thread = None
                    return
                self._wanted = False
            refresh_loss_curve(self.out_dir)

    def join(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


def plot_health(metrics_file: str, out_png: str, title: str | None = None) -> None:
    """Heatmaps of layer x iteration for each per-layer health quantity (train.py --health_interval) in out_png;
    gradient norms and update ratios on a log colour scale."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    rows = []
    with open(metrics_file) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "act_rms" in r:
                rows.append(r)
    if not rows:
        raise ValueError(f"{metrics_file} has no health records: train with --health_interval=N")
    names = [("grad_norm", "gradient norm", True), ("update_ratio", "update / weight", True)]
    names.append(("act_rms", "output RMS", False))
    if "attn_entropy" in rows[0]:  # (older runs' records lack it)
        names.append(("attn_entropy", "attention entropy (nats)", False))
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True)
    iters = [r["iter"] for r in rows]
    for ax, (key, label, log) in zip(axes, names, strict=True):
        layers = range(len(rows[0][key]))
        grid = [[max(r[key][layer], 1e-12) if log else r[key][layer] for r in rows] for layer in layers]
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            extent=(iters[0] - 0.5, iters[-1] + 0.5, -0.5, len(grid) - 0.5),
            norm=LogNorm() if log else None,
        )
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label=label)
    axes[-1].set_xlabel("iteration")
    axes[0].set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_file))), fontsize=10)
    save_png(fig, out_png)
