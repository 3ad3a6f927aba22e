"""The recorded loss curve: every training loss and the final val loss of a fixed tiny CPU float32 run, checked to
1e-5, so a change that alters numerics (a refactor that reorders a sum, a new default) is seen, not only a change
that stops the loss from falling. The run's data is generated here (synthetic_play), not read from ../shared, and
it runs on one thread, so the curve is the same on every machine like this one.

When a change is meant to alter numerics, regenerate the file and say why in the commit:

    REGENERATE_LOSSES=1 python -m pytest tests/test_loss_curve.py
"""

import json
import os

import torch
from conftest import ROOT, synthetic_play

import train

CURVE = os.path.join(ROOT, "tests", "assets", "losses", "tiny_char_cpu_fp32.json")
RUN = [
    "--device=cpu",
    "--dtype=float32",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--dropout=0.1",  # the per-step reseeding is part of what is pinned
    "--learning_rate=3e-3",
    "--warmup_iters=3",
    "--max_iters=16",
    "--eval_interval=16",
    "--eval_iters=2",
    "--log_interval=1",
    "--seed=1337",
]


def run_curve(tmp_path) -> dict:
    import shakespeare_char

    data = tmp_path / "data" / "play"
    data.mkdir(parents=True)
    (data / "input.txt").write_text(synthetic_play(30_000), encoding="utf-8")
    shakespeare_char.main([f"--out={data}"])
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a matmul's sums split over threads in an order that depends on their number
    try:
        assert train.main([f"--data_root={data.parent}", "--dataset=play", f"--out_dir={out}", *RUN]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {
        "train_loss_per_iteration": [r["loss"] for r in rows if "loss" in r],
        "val_loss_at_end": [r["val_loss"] for r in rows if "val_loss" in r][-1],
    }


def test_the_training_losses_match_the_recorded_curve(tmp_path):
    got = run_curve(tmp_path)
    if os.environ.get("REGENERATE_LOSSES"):
        os.makedirs(os.path.dirname(CURVE), exist_ok=True)
        with open(CURVE, "w") as f:
            json.dump({"command": RUN, **got}, f, indent=2)
            f.write("\n")
    with open(CURVE) as f:
        recorded = json.load(f)
    assert recorded["command"] == RUN, "the run changed: regenerate the curve (see the module docstring)"
    assert len(got["train_loss_per_iteration"]) == len(recorded["train_loss_per_iteration"]) == 16
    for i, (a, b) in enumerate(zip(got["train_loss_per_iteration"], recorded["train_loss_per_iteration"], strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i}: loss {a} against the recorded {b}"
    assert abs(got["val_loss_at_end"] - recorded["val_loss_at_end"]) <= 1e-5 * recorded["val_loss_at_end"]
    assert got["train_loss_per_iteration"][-1] < got["train_loss_per_iteration"][0]  # and it is a training curve
