"""Batch-size warmup: the ramp's steps by hand, a run whose batches, token counter and learning rate follow it, exact
resume in the middle of the ramp, 2 DDP ranks equal to one process, and the one-line errors."""

import os
from types import SimpleNamespace

import pytest
import torch
from test_distributed import CONFIG, rank_logs, torchrun
from test_distributed import records as ddp_records
from test_train import args, final_weights, records, step_losses

import train
from engine import loss_curve
from engine.batch_schedule import BatchWarmup, check_process_count, done
from engine.errors import UserError

# 4 micro-steps of 4 x 16 tokens once warm; from 1 micro-step, over the first 1,024 tokens (8 full batches' worth)
WARMUP = ["--gradient_accumulation_steps=4", "--batch_warmup_tokens=1024", "--eval_interval=100"]


def test_the_ramp_grows_linearly_in_whole_multiples_of_the_start():
    ramp = BatchWarmup(full=4, start=1, tokens=1024, micro_tokens=64, max_iters=6)
    steps, tokens, progress = [], 0, 0.0
    while not done(progress, 6):
        m, tokens, progress = ramp.advance(tokens, progress)
        steps.append(m)
    # 1 + 3 * tokens / 1024 micro-steps, rounded down: 2 from 342 tokens on, 3 from 683, 4 once 1,024 are trained;
    # the last step takes the 2 micro-steps left of max_iters=6 full batches (24), not a whole batch past them
    assert steps == [1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 2]
    assert (tokens, progress) == (1536, 6.0) and ramp.steps_left(0, 0.0) == len(steps)
    assert [BatchWarmup(8, 2, 1000, 10).micro_steps(t, 0.0) for t in range(0, 1100, 100)] == [
        2,
        2,
        2,
        2,
        4,
        4,
        4,
        6,
        6,
        6,
        8,
    ]
    assert BatchWarmup(8, 2, 0, 10).micro_steps(0, 0.0) == 8 and BatchWarmup(8, 2, 0, 10, 10).steps_left(0, 3.0) == 7


def test_the_last_step_stops_at_max_iters_in_full_batches_of_this_run():
    """What is left is counted in full batches: resumed with another gradient_accumulation_steps, the run still ends
    at max_iters; and the last step is a whole number of micro-steps per process (multiples of start)."""
    before, after = BatchWarmup(8, 1, 0, 64, max_iters=10), BatchWarmup(6, 1, 0, 64, max_iters=10)
    tokens, progress = 0, 0.0
    for _ in range(5):
        _, tokens, progress = before.advance(tokens, progress)
    steps = []
    while not done(progress, 10):
        m, tokens, progress = after.advance(tokens, progress)
        steps.append(m)
    assert steps == [6] * 5 and progress == pytest.approx(10.0)
    assert BatchWarmup(6, 2, 0, 64, max_iters=10).micro_steps(0, 9.5) == 4  # 3 left, rounded up to whole pairs


def test_a_run_follows_the_ramp_in_batches_tokens_and_learning_rate(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=6", *WARMUP))
    printed = capsys.readouterr().out
    assert "# batch warmup: from 64 to 256 tokens per iteration over the first 1,024 tokens; 13 iterations" in printed
    assert "iter 12/13 (92%)" in printed
    steps = [r for r in records(out) if "loss" in r]
    assert [r["batch_tokens"] // 64 for r in steps] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 2]  # exactly 6 x 4
    tokens, progress = 0, 0.0
    cfg = train.parse_config(train.TrainConfig, args(char_data, out, "--max_iters=6", *WARMUP))
    for r in steps:
        assert r["lr"] == pytest.approx(train.scheduled_lr(cfg, progress), rel=1e-12)  # full batches' worth so far
        tokens, progress = tokens + r["batch_tokens"], progress + r["batch_tokens"] / 256
        assert r["tokens"] == tokens
    assert [r["iter"] for r in records(out) if "val_loss" in r] == [0, 13]  # ends at max_iters full batches' worth
    assert loss_curve.tokens_per_iter(out) is None  # the plot draws no tokens axis: iterations vary in size


def test_resume_in_the_middle_of_the_ramp_is_bit_exact(char_data, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.main(args(char_data, whole, "--max_iters=6", *WARMUP))
    train.main(args(char_data, parts, "--max_iters=3", *WARMUP))  # stops after 9 steps, 3 full batches' worth
    assert max(step_losses(parts)) == 8
    train.main(args(char_data, parts, "--max_iters=6", "--init_from=resume", *WARMUP))
    assert step_losses(parts) == step_losses(whole)
    a, b = final_weights(whole), final_weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_warmup_settings_are_checked_in_one_line(char_data, tmp_path):
    with pytest.raises(UserError, match="batch_warmup_start must be in"):
        train.main(args(char_data, str(tmp_path / "a"), "--batch_warmup_start=5", *WARMUP))
    with pytest.raises(UserError, match="batch_warmup_tokens must be >= 0"):
        train.main(args(char_data, str(tmp_path / "b"), "--batch_warmup_tokens=-1"))
    cfg = train.TrainConfig(gradient_accumulation_steps=4, batch_warmup_start=1, batch_warmup_tokens=10)
    with pytest.raises(UserError, match="batch_warmup_start=1 is not divisible by the 2 processes"):
        check_process_count(
            cfg.gradient_accumulation_steps, cfg.batch_warmup_start, SimpleNamespace(world_size=2, ddp=False)
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_warm_up_as_one_process(char_data, tmp_path, mode):
    run = [f"--data_root={char_data}", "--dataset=tiny_char", *CONFIG, "--gradient_accumulation_steps=4"]
    run += ["--batch_warmup_tokens=512", "--batch_warmup_start=2"]  # 2 micro-steps (one per rank), then 4
    single, ddp = str(tmp_path / "single"), str(tmp_path / mode)
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ddp}", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = ddp_records(single), ddp_records(ddp)
    assert [r.get("batch_tokens") for r in ours] == [r.get("batch_tokens") for r in theirs]
    assert {r.get("batch_tokens") for r in ours} == {None, 128, 256}
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "val_loss", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)
    assert os.path.basename(train.find_checkpoint(single)) == os.path.basename(train.find_checkpoint(ddp))
