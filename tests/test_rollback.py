"""Loss-spike rollback: a run started at an absurd learning rate diverges, rolls back with a smaller rate each time
and ends with a finite val loss below the one at initialisation; a single bad step rolls back once, to the newest
checkpoint, and the run recovers; resume after a rollback is bit-exact; and rollbacks run out with exit code 3."""

import json
import os
import shutil

import pytest
import torch
from conftest import row_layout
from test_distributed import CONFIG, rank_logs, torchrun
from test_train import args, step_losses

import train
from engine.errors import EXIT_NONFINITE


def records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def nan_at(monkeypatch, calls: set[int]) -> None:
    """Make the gradient norm non-finite at the given (0-based) optimizer steps of this process, once each."""
    real, seen = torch.nn.utils.clip_grad_norm_, [0]

    def clip(*a, **k):
        seen[0] += 1
        norm = real(*a, **k)
        return torch.tensor(float("nan")) if seen[0] - 1 in calls else norm

    monkeypatch.setattr(train.torch.nn.utils, "clip_grad_norm_", clip)


def test_a_diverging_run_rolls_back_with_smaller_rates_and_ends_finite(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = train.main(
        args(char_data, out, "--max_iters=60", "--eval_interval=30", "--learning_rate=50", "--decay_lr=False")
        + ["--spike_lr_scale=0.1", "--max_rollbacks=5", "--log_interval=5"]
    )
    assert code == 0
    rollbacks = [r for r in records(out) if "rollback" in r]
    assert rollbacks and [r["lr_scale"] for r in rollbacks] == [0.1 ** (i + 1) for i in range(len(rollbacks))]
    evals = [r for r in records(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and torch.isfinite(torch.tensor(evals[-1]["val_loss"]))
    assert "loss spike" in capsys.readouterr().out


def test_one_bad_step_rolls_back_once_to_the_newest_checkpoint(char_data, tmp_path, monkeypatch, capsys):
    clean, bad = str(tmp_path / "clean"), str(tmp_path / "bad")
    run = ["--max_iters=24", "--eval_interval=6", "--spike_patience=1", "--always_save_checkpoint=True"]
    run.append("--spike_lr_scale=1")  # the same schedule after the rollback: only the data moves on
    train.main(args(char_data, clean, *run))
    nan_at(monkeypatch, {8})
    assert train.main(args(char_data, bad, *run)) == 0
    rollbacks = [r for r in records(bad) if "rollback" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["iter"] == 8 and rollbacks[0]["to_iter"] == 6
    assert rollbacks[0]["to"].endswith("ckpt-0000006")
    a, b = step_losses(clean), step_losses(bad)
    assert [a[i] for i in range(6)] == [b[i] for i in range(6)]  # the same run until the bad step
    final = [r["val_loss"] for r in records(clean) if "val_loss" in r][-1]
    assert [r["val_loss"] for r in records(bad) if "val_loss" in r][-1] < final * 1.05  # and it recovered


def test_resume_after_a_rollback_is_bit_exact(char_data, tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = ["--eval_interval=6", "--spike_patience=1"]
    nan_at(monkeypatch, {4})
    train.main(args(char_data, a, "--max_iters=12", *run))
    nan_at(monkeypatch, {4})
    train.main(args(char_data, b, "--max_iters=8", *run))
    train.main(args(char_data, b, "--max_iters=12", "--init_from=resume", *run))
    la, lb = step_losses(a), step_losses(b)
    assert [la[i] for i in range(8, 12)] == [lb[i] for i in range(8, 12)]
    assert [r["rollback"] for r in records(a) if "rollback" in r] == [1]


def test_rollbacks_run_out_with_exit_code_3(char_data, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, set(range(1000)))
    out = str(tmp_path / "out")
    code = train.main(args(char_data, out, "--max_iters=20", "--spike_patience=1", "--max_rollbacks=2"))
    assert code == EXIT_NONFINITE
    assert "stopping: a loss spike after 2 rollbacks" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, to",
    [("ddp", "start"), ("fsdp", "start"), ("fsdp", "checkpoint")],  # the start held in memory, or a checkpoint
)
def test_two_ranks_roll_back_as_one_process(char_data, tmp_path, mode, to):
    run = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    run += [
        "--spike_lr_scale=1e-4",
        "--max_iters=12",
        "--ema_decay=0.5",
        f"--eval_interval={4 if to == 'checkpoint' else 12}",
    ]
    absurd = ["--learning_rate=50", "--decay_lr=False"]
    single, ranks = str(tmp_path / "single"), str(tmp_path / mode)
    fsdp = f"--fsdp={mode == 'fsdp'}"
    if to == "checkpoint":  # 4 sane steps, then a resume at an absurd rate: back to that checkpoint, at once
        train.main([*run, f"--out_dir={single}", "--max_iters=4"])
        assert torchrun(tmp_path, *run, f"--out_dir={ranks}", "--max_iters=4", fsdp).returncode == 0
        run += ["--init_from=resume"]
    train.main([*run, *absurd, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, *absurd, f"--out_dir={ranks}", fsdp)
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = records(single), records(ranks)
    rollbacks = [(r["iter"], r["to_iter"], os.path.basename(r["to"])) for r in ours if "rollback" in r]
    assert rollbacks == [(r["iter"], r["to_iter"], os.path.basename(r["to"])) for r in theirs if "rollback" in r]
    assert rollbacks[0][1:] == ((4, "ckpt-0000004") if to == "checkpoint" else (0, "the start of this run"))
    # the evaluation after each rollback sees exactly the weights it went back to: it repeats theirs
    for _, to_iter, _ in rollbacks:
        evals = [r["val_loss"] for r in theirs if "val_loss" in r and r["iter"] == to_iter]
        assert len(evals) >= 2 and len(set(evals)) == 1, evals
    # diverging steps amplify the order of float sums (DDP averages gradients), so compare the recovered run's
    # losses: from the last rollback on
    last = max(i for i, r in enumerate(ours) if "rollback" in r)
    last_theirs = max(i for i, r in enumerate(theirs) if "rollback" in r)
    assert row_layout(ours[last:]) == row_layout(theirs[last_theirs:])  # the same rows, then the step losses
    after = [r["loss"] for r in ours[last:] if "loss" in r], [r["loss"] for r in theirs[last_theirs:] if "loss" in r]
    assert None not in after[0] + after[1], after  # a non-finite loss is written as null
    assert after[0] == pytest.approx(after[1], rel=1e-4)


@pytest.mark.parametrize("always_save", [True, False])
def test_the_checkpoint_after_a_rollback_records_it_and_resumes_as_the_run_went_on(
    char_data, tmp_path, monkeypatch, always_save
):
    """A rollback to ckpt-K revisits iteration K: the rolled-back state (rollback count, learning-rate scale, new
    data windows) is saved there at once, whether or not evaluations save, so a crash before the next checkpoint
    resumes the run as it was; its rollback row stays in metrics.jsonl."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = ["--max_iters=12", "--eval_interval=6", "--spike_patience=1", "--spike_lr_scale=0.5", "--dtype=float32"]
    run.append(f"--always_save_checkpoint={always_save}")
    nan_at(monkeypatch, {8})
    train.main(args(char_data, a, *run))
    assert [(r["iter"], r["to_iter"]) for r in records(a) if "rollback" in r] == [(8, 6)]
    saved = torch.load(os.path.join(a, "ckpt-0000006-r1", "state.pt"), weights_only=True)
    assert (saved["rollbacks"], saved["lr_scale"], saved["iter_num"]) == (1, 0.5, 6)
    assert os.path.basename(train.find_checkpoint(a)) == "ckpt-0000012-r1"
    # the crash: b is a up to the checkpoint after the rollback
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("ckpt-0000012*", ".lock"))
    assert os.path.basename(train.find_checkpoint(b)) == "ckpt-0000006-r1"
    monkeypatch.undo()
    train.main(args(char_data, b, "--init_from=resume", *run))
    la, lb = step_losses(a), step_losses(b)
    assert [la[i] for i in range(6, 12)] == [lb[i] for i in range(6, 12)]
    assert [r["rollback"] for r in records(b) if "rollback" in r] == [1]  # the rollback it resumed after
    lrs = {r["iter"]: r["lr"] for r in records(b) if "lr" in r}
    assert lrs[11] == {r["iter"]: r["lr"] for r in records(a) if "lr" in r}[11]  # the scaled rate, not double it


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["--fsdp=True", "--zero_stage=2", "--zero_stage=1"])
def test_sharded_runs_roll_back_to_the_start_twice(char_data, tmp_path, sharding):
    """The start snapshot stays as it was after a restore (each rank's copy of its shards under FSDP, rank 0's
    optimizer state under ZeRO-1), so a second rollback to it restores the same weights: the evaluation after each
    repeats the first."""
    run = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    run += ["--max_iters=12", "--eval_interval=12", "--learning_rate=50", "--decay_lr=False", "--ema_decay=0.5"]
    run += ["--spike_lr_scale=0.5", "--max_rollbacks=2", f"--out_dir={tmp_path / 'out'}", sharding]
    torchrun(tmp_path, *run)  # its ranks exit with 3 (the spikes outlast 2 rollbacks): torchrun's own code is 1
    assert "stopping: a loss spike after 2 rollbacks" in rank_logs(tmp_path, "stdout")[0]
    assert "Traceback" not in "".join(rank_logs(tmp_path, "stderr"))
    rows = records(str(tmp_path / "out"))
    assert [r["to_iter"] for r in rows if "rollback" in r] == [0, 0]
    evals = [(r["val_loss"], r["val_loss_ema"]) for r in rows if "val_loss" in r and r["iter"] == 0]
    assert len(evals) == 3 and len(set(evals)) == 1, evals
