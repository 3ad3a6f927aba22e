"""EMA weights: the average follows ema = decay * ema + (1 - decay) * weight step by step, is saved and restored so
a resumed run is bit-exact, is the same on 2 DDP ranks as in one process, is evaluated beside the raw weights, and is
what sample.py, tools/evaluate.py and tools/export_hf.py load with --weights=ema."""

import os

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import CONFIG, rank_logs, records, torchrun
from test_train import args, step_losses

import sample
import train
from engine.checkpoint import find_checkpoint, list_checkpoints, load_model, load_state
from engine.errors import UserError


def raw_and_average(path) -> tuple[dict, dict]:
    return load_file(os.path.join(path, "model.safetensors")), load_state(path)["ema"]


def test_the_average_follows_the_update_rule_step_by_step(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=3", "--eval_interval=1", "--ema_decay=0.5", "--keep_last=5"))
    ckpts = list_checkpoints(out)
    assert [os.path.basename(c) for c in ckpts] == ["ckpt-0000001", "ckpt-0000002", "ckpt-0000003"]
    (_, e2), (w3, e3) = raw_and_average(ckpts[1]), raw_and_average(ckpts[2])
    for name, t in e3.items():
        torch.testing.assert_close(t, 0.5 * e2[name] + 0.5 * w3[name], rtol=0, atol=1e-7)
    assert any((e3[n] - w3[n]).abs().max() > 1e-4 for n in e3)  # the average is not the weights
    assert "(EMA weights: train loss" in capsys.readouterr().out


def test_resume_with_ema_is_bit_exact(char_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ema = ["--ema_decay=0.9", "--eval_interval=6"]
    train.main(args(char_data, a, "--max_iters=12", *ema))
    train.main(args(char_data, b, "--max_iters=6", *ema))
    train.main(args(char_data, b, "--max_iters=12", "--init_from=resume", *ema))
    la, lb = step_losses(a), step_losses(b)
    assert [la[i] for i in range(6, 12)] == [lb[i] for i in range(6, 12)]
    ea, eb = (load_state(find_checkpoint(d))["ema"] for d in (a, b))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_readers_load_the_average_with_weights_ema(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4", "--ema_decay=0.8"))
    path = find_checkpoint(out)
    model, _ = load_model(path, weights="ema")
    average = load_state(path)["ema"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in average.items())
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--weights=ema", "--num_samples=1", "--max_new_tokens=5", "--device=cpu"])
    assert "EMA weights" in capsys.readouterr().err
    plain = str(tmp_path / "plain")
    train.main(args(char_data, plain, "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(UserError, match="trained without --ema_decay"):
        load_model(find_checkpoint(plain), weights="ema")
    with pytest.raises(UserError, match="trained without --ema_decay"):
        train.main(args(char_data, plain, "--max_iters=4", "--eval_interval=2", "--init_from=resume", "--ema_decay=.9"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_average_as_one_process(char_data, tmp_path, mode):
    """Under FSDP each rank averages its shards, and the checkpoint holds the whole average."""
    run = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    run += ["--ema_decay=0.7", "--eval_interval=3"]  # a resume in between: the average is restored into the shards
    single, ranks = str(tmp_path / "single"), str(tmp_path / mode)
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ranks}", "--max_iters=3", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    result = torchrun(tmp_path, *run, f"--out_dir={ranks}", "--init_from=resume", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = (load_state(find_checkpoint(d))["ema"] for d in (single, ranks))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    evals = [[r["val_loss_ema"] for r in records(d) if "val_loss_ema" in r] for d in (single, ranks)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)
