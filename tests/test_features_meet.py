"""Features where they meet: each pair that shares a path (resume, init_from, LoRA, EMA, rollback, batch warmup,
FP8) either works together, with the guarantees each gives alone, or is refused in one line before anything runs."""

import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_chat import COLORS, THINGS, prepare
from test_classify import prepare_labelled
from test_distributed import CONFIG, records
from test_train import args

import train
from engine.checkpoint import find_checkpoint, load_model, load_state
from engine.data import first_targets, load_data
from engine.errors import UserError
from engine.lora import merge_lora


def test_resuming_an_ema_run_without_ema_decay_is_refused_rather_than_dropping_the_average(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2", "--ema_decay=0.9"))
    with pytest.raises(UserError, match=r"ema_decay \(0.9 -> 0: the checkpoint keeps a weight average\)"):
        train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume", "--ema_decay=0.9"))


def test_fp8_with_lora_is_refused_in_one_line():
    with pytest.raises(ValueError, match="fp8=True with lora_rank is not supported"):
        train.TrainConfig(lora_rank=4, fp8=True)


def few_answers_in_reach(tmp_path, *extra) -> str:
    """A chat dataset where 3 in 4 conversations put their answer past a 16-token row: a long question first."""
    rows = []
    for i, (thing, color) in enumerate(zip(THINGS, COLORS, strict=True)):
        question = f"{thing}?" if i % 4 == 0 else f"tell me please, what is the color of {thing}?"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": color}]})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return prepare(tmp_path, rows, "--val_fraction=0.25", *extra)


def test_chat_batches_with_nothing_to_learn_neither_step_nor_count_as_a_loss_of_zero(tmp_path, capsys):
    """Rollback on chat data: a batch without one assistant token has no loss (not 0, which made every normal loss a
    spike against a median of 0), takes no step, and an evaluation without targets says so instead of logging NaN."""
    root = few_answers_in_reach(tmp_path)
    out = str(tmp_path / "out")
    run = [f"--data_root={root}", "--dataset=chat", f"--out_dir={out}", *CONFIG, "--block_size=16"]
    run += [
        "--batch_size=1",
        "--gradient_accumulation_steps=1",
        "--max_iters=30",
        "--eval_interval=15",
        "--spike_patience=1",
    ]
    assert train.main(run) == 0  # rollback on, as by default
    printed = capsys.readouterr().out
    data = load_data(os.path.join(root, "chat"), 16)
    shares = {split: float(np.mean(first_targets(data, split) <= 16)) for split in ("train", "val")}
    assert 0 < shares["train"] < 0.5 and f"note: only {shares['train']:.0%} of the train split's" in printed
    rows = records(out)
    assert not [r for r in rows if "rollback" in r]
    steps = [r for r in rows if "lr" in r]
    empty = [r for r in steps if r["loss"] is None]
    assert empty and len(empty) < len(steps) and "loss n/a (no assistant tokens)" in printed
    assert all(r["loss"] > 0.5 for r in steps if r["loss"] is not None)
    for r in [r for r in rows if "val_loss" in r]:  # a number, or None when no batch had a target: never NaN
        assert r["val_loss"] is None or math.isfinite(r["val_loss"])
    with pytest.raises(UserError, match="no conversation of .* has an assistant token within block_size=4"):
        train.main([*run[:-5], "--block_size=4", f"--out_dir={tmp_path / 'short'}"])


def test_a_chat_evaluation_without_one_target_has_no_loss_rather_than_nan(tmp_path, monkeypatch, capsys):
    root = few_answers_in_reach(tmp_path)
    out = str(tmp_path / "out")
    monkeypatch.setattr(
        train, "get_batch", lambda *a, **k: (torch.zeros(1, 16, dtype=torch.long), torch.full((1, 16), -1))
    )
    run = [f"--data_root={root}", "--dataset=chat", f"--out_dir={out}", *CONFIG, "--eval_only=True"]
    train.main(run)
    assert [(r["train_loss"], r["val_loss"]) for r in records(out) if "val_loss" in r] == [(None, None)]
    assert "step 0: train loss n/a (no assistant tokens), val loss n/a (no assistant tokens)" in capsys.readouterr().out


def test_prepare_says_how_far_into_conversations_the_answers_start(tmp_path, capsys):
    few_answers_in_reach(tmp_path / "a")
    reach = re.search(
        r"first token is within the first (\d+) tokens in half the conversations", capsys.readouterr().out
    )
    assert reach and int(reach.group(1)) > 16  # most answers start past a 16-token row
    few_answers_in_reach(tmp_path / "b", "--block_size=24")
    assert "warning: 15 of 20 conversations were dropped for leaving no assistant token" in capsys.readouterr().out


RESUMED = {  # features that share the save/resume path, alone and together
    "lora": ["--lora_rank=2"],
    "ema": ["--ema_decay=0.8"],
    "warmup": ["--batch_warmup_tokens=256"],
    "lora+ema+warmup": ["--lora_rank=2", "--ema_decay=0.8", "--batch_warmup_tokens=256"],
    "chat+lora+ema": ["chat", "--lora_rank=2", "--ema_decay=0.8"],
    "chat+warmup+recompute": ["chat", "--batch_warmup_tokens=256", "--gradient_checkpointing=True"],
    "encoder+lora+ema+warmup": ["--arch=encoder", "--lora_rank=2", "--ema_decay=0.8", "--batch_warmup_tokens=256"],
    "encoder+recompute+rollback+health": ["--arch=encoder", "--gradient_checkpointing=True", "--max_rollbacks=2"]
    + ["--health_interval=2"],
    "classifier+lora+ema+warmup": ["labelled", "--arch=encoder", "--lora_rank=2", "--ema_decay=0.8"]
    + ["--batch_warmup_tokens=512"],
    "classifier+recompute+rollback+health": ["labelled", "--arch=encoder", "--gradient_checkpointing=True"]
    + ["--max_rollbacks=2", "--health_interval=2"],
    "seq2seq+lora+ema+warmup": ["pairs", "--arch=encoder_decoder", "--pos_embedding=t5", "--lora_rank=2"]
    + ["--ema_decay=0.8", "--batch_warmup_tokens=256"],
    "seq2seq+recompute+rollback+muon": ["pairs", "--arch=encoder_decoder", "--gradient_checkpointing=True"]
    + ["--max_rollbacks=2", "--optimizer=muon"],
}


@pytest.mark.parametrize("case", RESUMED)
def test_features_together_resume_bit_exact_and_their_checkpoints_load(case, char_data, tmp_path):
    flags = [f for f in RESUMED[case] if f not in ("chat", "labelled", "pairs")]
    if "chat" in RESUMED[case]:
        data = [f"--data_root={prepare(tmp_path)}", "--dataset=chat", "--block_size=48"]
    elif "labelled" in RESUMED[case]:  # a classifier (tests/test_classify.py's labelled texts)
        data = [f"--data_root={prepare_labelled(char_data, tmp_path)}", "--dataset=labelled", "--block_size=64"]
    elif "pairs" in RESUMED[case]:  # an encoder-decoder (prepare/reverse.py's pairs)
        import reverse

        reverse.main([f"--out={char_data}/reverse", "--n_train=100", "--n_val=10"])
        data = [f"--data_root={char_data}", "--dataset=reverse", "--block_size=16"]
    else:
        data = [f"--data_root={char_data}", "--dataset=tiny_char"]
    run = [*CONFIG, *data, "--gradient_accumulation_steps=2", "--eval_interval=3", *flags]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.main([*run, f"--out_dir={whole}", "--max_iters=6"])
    train.main([*run, f"--out_dir={parts}", "--max_iters=3"])
    train.main([*run, f"--out_dir={parts}", "--max_iters=6", "--init_from=resume"])
    losses = [{r["iter"]: r["loss"] for r in records(d) if "lr" in r} for d in (whole, parts)]
    assert losses[0] == losses[1] and len(losses[0]) >= 6
    a, b = (find_checkpoint(d) for d in (whole, parts))
    assert os.path.basename(a) == os.path.basename(b)
    wa, wb = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ema = "--ema_decay=0.8" in flags
    if ema:
        ea, eb = (load_state(p)["ema"] for p in (a, b))
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    for weights in ("raw", "ema") if ema else ("raw",):  # as sample.py, tools/evaluate.py and export_hf.py load
        model, _ = load_model(b, weights=weights)
        x = torch.zeros(1, 8, dtype=torch.long)
        inputs = (x, x) if model.config.arch == "encoder_decoder" else (x,)  # (an encoder-decoder's: a target too)
        adapted = model.eval()(*inputs)[0]
        merge_lora(model)
        torch.testing.assert_close(model(*inputs)[0], adapted, atol=1e-5, rtol=1e-5)
