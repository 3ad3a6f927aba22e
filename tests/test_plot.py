"""Loss curves: a real training run's metrics.jsonl becomes a PNG of the promised size; runs overlay; a broken or
missing input never raises from refresh_loss_curve."""

import json
import struct

from conftest import TINY_TRAIN

import train
from engine import loss_curve
from tools import plot

TINY = TINY_TRAIN


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_refresh_after_training(char_data, tmp_path):
    out = tmp_path / "out"
    train.main(
        [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *TINY]
        + ["--max_iters=10", "--eval_interval=5", "--log_interval=1"]
    )
    path = loss_curve.refresh_loss_curve(str(out))
    assert path == str(out / "loss_curve.png")
    assert png_size(path) == (loss_curve.FIGSIZE[0] * loss_curve.DPI, loss_curve.FIGSIZE[1] * loss_curve.DPI)
    assert loss_curve.tokens_per_iter(str(out)) == 2 * 4 * 16  # gradient_accumulation_steps * batch_size * block_size
    m = loss_curve.read_metrics(str(out / "metrics.jsonl"))
    assert m.iters == list(range(10)) and m.eval_iters == [0, 5, 10]


def write_run(run, losses, tokens_per_iter_line=True):
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"iter": i, "loss": loss, "lr": 1e-3 * (i + 1), "dt": 0.1, "tokens_per_sec": 1}) + "\n")
            if i % 2 == 0:
                f.write(json.dumps({"iter": i, "train_loss": loss, "val_loss": None if i == 2 else loss + 0.1}) + "\n")
        f.write('{"iter": 9, "lo')  # a torn last line, as while training writes
    if tokens_per_iter_line:
        (run / "train_config.py").write_text("gradient_accumulation_steps = 2\nbatch_size = 3\nblock_size = 8\n")


def test_overlay_and_cli(tmp_path, capsys):
    write_run(tmp_path / "a", [4.0, 3.5, 3.0, 2.8])
    write_run(tmp_path / "b", [4.1, 3.2, 2.9, 2.5])
    m = loss_curve.read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    assert m.eval_iters == [0] and m.iters == [0, 1, 2, 3]  # the null val loss at iteration 2 is skipped
    assert loss_curve.tokens_per_iter(str(tmp_path / "a")) == 48
    out = tmp_path / "compare.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), f"--out={out}", "--labels=a,b"])
    assert png_size(out) == (1000, 600) and "wrote" in capsys.readouterr().out


def test_refresh_never_raises(tmp_path):
    assert loss_curve.refresh_loss_curve(str(tmp_path / "nowhere")) is None
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    (tmp_path / "loss_curve.png").mkdir()  # the PNG cannot be written over a directory
    assert loss_curve.refresh_loss_curve(str(tmp_path)) is None
