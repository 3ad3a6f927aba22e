"""Class 6 of "Nothing lost, by construction": crash debris and races.

What a writer killed at any moment leaves is cleared by the next one holding out_dir's lock (temporary checkpoints and
plots, a checkpoint pruning had begun to delete, a torn metrics line); a reader loading while a run prunes never takes
a deleted checkpoint for a corrupt one; a run restarted from scratch after a kill before its first checkpoint logs each
iteration once. (tests/test_reliability.py kills whole trainings at random moments.)"""

import os
import shutil
import signal

import pytest
from test_reliability import args, metrics, start, wait_for_iterations

import train
from engine import checkpoint


def test_the_next_run_clears_what_a_dead_writer_left(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    debris = [".tmp-ckpt-0000004-99999999", ".old-ckpt-0000002-99999999"]
    for name in debris:
        os.makedirs(os.path.join(out, name))
        open(os.path.join(out, name, "model.safetensors"), "wb").write(b"\0" * 1000)
    open(os.path.join(out, ".loss_curve.png.tmp-99999999-abc"), "wb").write(b"\x89PNG")
    open(os.path.join(out, "loss_curve.png.tmp-99999999.png"), "wb").write(b"\x89PNG")  # an older version's name
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"iter": 2, "loss": 1.')  # a write cut short by kill -9
    assert train.main(args(char_data, out, "--init_from=resume", "--max_iters=4", "--eval_interval=2")) == 0
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-", "loss_curve.png.tmp", ".loss_curve"))]
    rows = metrics(out)  # every line parses
    train_iters = [r["iter"] for r in rows if "loss" in r]
    assert train_iters == sorted(set(train_iters)) == [0, 1, 2, 3]


def test_a_reader_picks_again_when_its_checkpoint_is_pruned_under_it(char_data, tmp_path, monkeypatch):
    import shutil

    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=True"))
    older, newest = checkpoint.list_checkpoints(out)
    real, picked = checkpoint.load_model, []

    def pruned_first(path, *a, **k):  # a training run prunes the checkpoint between the pick and the read
        if not picked:
            picked.append(path)
            os.remove(os.path.join(path, "COMPLETE"))  # as prune_checkpoints does: unlisted first
            shutil.rmtree(path)
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoint, "load_model", pruned_first)
    path, model, meta = checkpoint.load_newest_model(out)
    assert picked == [newest] and path == older and meta["iter_num"] == 2


def test_a_checkpoint_half_deleted_by_pruning_is_cleared_at_the_next_start(char_data, tmp_path):
    """kill -9 during pruning (COMPLETE goes first, then the files) leaves ckpt-N/ with some of its files: not a
    checkpoint any reader lists, and the next run holding the lock removes it. A directory of that name holding
    anything else is not ours to delete."""
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2"))
    half, empty, foreign = (os.path.join(out, f"ckpt-000000{i}") for i in (1, 3, 5))
    shutil.copytree(os.path.join(out, "ckpt-0000004"), half)
    os.remove(os.path.join(half, "COMPLETE"))
    os.remove(os.path.join(half, "model.safetensors"))
    os.makedirs(empty)
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
        f.write("mine")
    assert train.main(args(char_data, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume")) == 0
    assert not os.path.exists(half) and not os.path.exists(empty) and os.path.isfile(os.path.join(foreign, "notes.txt"))


def test_a_reader_racing_pruning_is_never_told_every_checkpoint_is_corrupt(char_data, tmp_path, monkeypatch):
    """The reader lists ckpt-2 and ckpt-4; before it verifies them, the run saves ckpt-6 and prunes both (keep_last=1).
    Both are gone, not corrupt: the reader lists again and takes ckpt-6, with no warning."""
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=True"))
    spare = str(tmp_path / "spare")
    train.main(args(char_data, spare, "--max_iters=6", "--eval_interval=2", "--always_save_checkpoint=True"))
    real, warnings = checkpoint.verify_checkpoint, []

    def training_goes_on(path):
        if not os.path.exists(os.path.join(out, "ckpt-0000006")):  # the run saves ckpt-6, then prunes
            shutil.copytree(os.path.join(spare, "ckpt-0000006"), os.path.join(out, "ckpt-0000006"))
            checkpoint.prune_checkpoints(out, keep_last=1)
        return real(path)

    monkeypatch.setattr(checkpoint, "verify_checkpoint", training_goes_on)
    path = checkpoint.find_checkpoint(out, log=warnings.append)
    assert path == os.path.join(out, "ckpt-0000006") and not warnings


@pytest.mark.slow
def test_a_scratch_restart_after_a_kill_before_the_first_checkpoint_logs_each_iteration_once(char_data, tmp_path):
    out = str(tmp_path / "out")
    proc = start(args(char_data, out, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"))
    wait_for_iterations(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not checkpoint.list_checkpoints(out) and len([r for r in metrics(out) if "loss" in r]) >= 3
    assert train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2", "--log_interval=1")) == 0
    assert [r["iter"] for r in metrics(out) if "loss" in r] == [0, 1]
    assert [r["iter"] for r in metrics(out) if "val_loss" in r] == [0, 2]


def test_a_new_run_into_a_directory_holding_checkpoints_is_refused(char_data, tmp_path):
    """Whatever it starts from (here another run's weights), a new run would mix its checkpoints and rows with the
    ones there."""
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    train.main(args(char_data, other, "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(train.UserError, match="already holds checkpoints"):
        train.main(args(char_data, out, f"--init_from={other}", "--max_iters=4"))
