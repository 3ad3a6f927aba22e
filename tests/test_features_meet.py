"""Features where they meet: each pair that shares a path (resume, init_from, LoRA, EMA, rollback, batch warmup,
FP8) either works together, with the guarantees each gives alone, or is refused in one line before anything runs."""

import pytest
from test_train import args

import train
from engine.errors import UserError


def test_resuming_an_ema_run_without_ema_decay_is_refused_rather_than_dropping_the_average(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2", "--ema_decay=0.9"))
    with pytest.raises(UserError, match=r"ema_decay \(0.9 -> 0: the checkpoint keeps a weight average\)"):
        train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume", "--ema_decay=0.9"))


def test_fp8_with_lora_is_refused_in_one_line():
    with pytest.raises(ValueError, match="fp8=True with lora_rank is not supported"):
        train.TrainConfig(lora_rank=4, fp8=True)
