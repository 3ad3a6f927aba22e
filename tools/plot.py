"""Loss curves from metrics.jsonl: one run, or several overlaid to compare them.

    python tools/plot.py out-shakespeare-char                                    # writes loss_curve.png
    python tools/plot.py out-a out-b --out=compare.png --labels=baseline,rope    # run dirs or metrics.jsonl paths
    python tools/plot.py out-long --health=True --out=health.png                 # per-layer heatmaps

Each run draws its training loss at every logged iteration (thin, light), its evaluated train and val losses
(markers), and its learning rate on the right-hand axis; engine/loss_curve.py draws it. train.py refreshes
out_dir/loss_curve.png at every evaluation the same way.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

from engine.configurator import describe_fields, parse_config
from engine.errors import UserError, run_cli
from engine.files import check_output
from engine.loss_curve import metrics_path, plot_health, plot_runs


@dataclass
class PlotConfig:
    out: str = "loss_curve.png"  # the PNG to write
    labels: str | None = None  # legend names, comma-separated, one per run; none = the run directories' names
    title: str | None = None  # the plot's title; none = the run names
    health: bool = False  # one run's per-layer health heatmaps (train.py --health_interval) instead of loss curves


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + describe_fields(PlotConfig))
        return
    runs = [a for a in argv if not a.startswith("--")]  # positional: runs, not preset files
    cfg = parse_config(PlotConfig, [a for a in argv if a.startswith("--")], usage=__doc__)
    if not runs:
        raise UserError("give at least one run directory or metrics.jsonl: python tools/plot.py out-shakespeare-char")
    for run in runs:
        if not os.path.isfile(metrics_path(run)):
            raise UserError(f"no metrics.jsonl at {metrics_path(run)}")
    labels = cfg.labels.split(",") if cfg.labels else None
    if labels and len(labels) != len(runs):
        raise UserError(f"--labels has {len(labels)} names for {len(runs)} runs")
    if cfg.health and len(runs) != 1:
        raise UserError("--health draws one run: give one run directory")
    check_output(cfg.out, "--out")
    try:
        if cfg.health:
            plot_health(metrics_path(runs[0]), cfg.out, cfg.title)
        else:
            plot_runs(runs, cfg.out, labels, cfg.title)
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    run_cli(main)
