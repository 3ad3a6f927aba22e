"""train.main end to end on CPU: bit-exact resume, nanoGPT's log lines, metrics.jsonl, refusals, learning, wandb,
bfloat16 autocast."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from safetensors.torch import load_file

import train
from engine.checkpoint import find_checkpoint, list_checkpoints, read_meta
from engine.errors import UserError
from engine.fp8 import fp8_eligible
from engine.optim import lr_at

TINY = [
    *TINY_TRAIN,
    "--log_interval=1",
    "--dropout=0.1",
    "--warmup_iters=4",
    "--lr_decay_iters=24",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
]

# nanoGPT's training line, with progress and (after the first iterations) an ETA
ITER_LINE = re.compile(r"^iter (\d+)/10 \(\d+%\): loss (\d+\.\d{4}), time (\d+\.\d{2})ms, [\d,]+ tok/s(, eta \d+s)?$")
STEP_LINE = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$")  # nanoGPT's eval line


def args(char_data, out_dir, *extra) -> list[str]:
    return [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out_dir}", *TINY, *extra]


def records(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir) -> dict[int, float]:
    """Training loss per logged iteration (the last record wins when a resumed run logs an iteration again)."""
    return {r["iter"]: r["loss"] for r in records(out_dir) if "loss" in r}


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(find_checkpoint(out_dir), "model.safetensors"))


def test_resume_is_bit_exact(char_data, tmp_path):
    """24 iterations in one go, or 12 then a resume to 24, give identical losses and weights: data windows and
    dropout masks are functions of (seed, iteration), and optimizer state is restored exactly. Dropout and
    gradient accumulation are on, so both must be handled for this to hold."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(args(char_data, a, "--max_iters=24", "--eval_interval=12"))
    train.main(args(char_data, b, "--max_iters=12", "--eval_interval=12"))
    assert os.path.basename(find_checkpoint(b)) == "ckpt-0000012"
    train.main(args(char_data, b, "--max_iters=24", "--eval_interval=12", "--init_from=resume"))

    losses_a, losses_b = step_losses(a), step_losses(b)
    assert sorted(losses_a) == sorted(losses_b) == list(range(24))
    assert [losses_a[i] for i in range(12, 24)] == [losses_b[i] for i in range(12, 24)]
    assert losses_a[23] < losses_a[0]  # it trained

    wa, wb = final_weights(a), final_weights(b)
    assert os.path.basename(find_checkpoint(a)) == os.path.basename(find_checkpoint(b)) == "ckpt-0000024"
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_meta(find_checkpoint(a))["val_loss"] == read_meta(find_checkpoint(b))["val_loss"]


def test_log_lines_and_metrics_records(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=10", "--eval_interval=5", "--log_interval=3", "--warmup_iters=2"))
    lines = capsys.readouterr().out.splitlines()

    iter_lines = [m for m in map(ITER_LINE.match, lines) if m]
    step_lines = [m for m in map(STEP_LINE.match, lines) if m]
    assert [int(m[1]) for m in iter_lines] == [0, 3, 6, 9]  # every log_interval, from 0, as nanoGPT
    assert "iter 9/10 (90%)" in lines[lines.index(iter_lines[-1][0])] and iter_lines[-1][4] == ", eta 0s"
    assert "max_iters = 10" in lines and "n_layer = 2" in lines and "bias = False" not in lines  # the overrides
    assert [int(m[1]) for m in step_lines] == [0, 5, 10]  # every eval_interval and the last step

    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert len(steps) + len(evals) == len(recs)
    assert [r["iter"] for r in steps] == [0, 3, 6, 9]
    assert [r["iter"] for r in evals] == [0, 5, 10]
    tokens_per_iter = 2 * 4 * 16  # gradient_accumulation_steps * batch_size * block_size
    for r, m in zip(steps, iter_lines, strict=True):
        assert {"iter", "loss", "lr", "dt", "tokens_per_sec"} <= r.keys() and "mfu" not in r  # no known CPU peak
        assert f"{r['loss']:.4f}" == m[2] and f"{r['dt'] * 1000:.2f}" == m[3]
        assert r["lr"] == lr_at(r["iter"], 3e-3, 2, 24, 3e-4)
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_iter / r["dt"])
    for r, m in zip(evals, step_lines, strict=True):
        assert set(r) == {"iter", "train_loss", "val_loss"}
        assert (f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}") == (m[2], m[3])
    # at init the model is near-uniform over the vocabulary: loss ~ ln(vocab_size) (GPT-2 init, std 0.02)
    vocab_size = read_meta(find_checkpoint(out))["model_config"]["vocab_size"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab_size), abs=0.1)


def test_eval_only_evaluates_once_and_saves_nothing(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=100", "--eval_interval=10", "--eval_only=True"))
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert [STEP_LINE.match(ln)[1] for ln in lines if STEP_LINE.match(ln)] == ["0"]
    assert not any(ITER_LINE.match(ln) for ln in lines)
    assert list_checkpoints(out) == []
    recs = records(out)
    assert len(recs) == 1 and recs[0]["iter"] == 0 and set(recs[0]) == {"iter", "train_loss", "val_loss"}


def test_eval_only_on_a_checkpoint_reproduces_its_val_loss(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4"))
    before = list_checkpoints(out)
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4", "--init_from=resume", "--eval_only=True"))
    assert list_checkpoints(out) == before
    last = records(out)[-1]
    assert last["iter"] == 4 and last["val_loss"] == read_meta(before[-1])["val_loss"]


def test_scratch_run_refuses_an_out_dir_with_checkpoints(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(UserError, match="init_from=resume"):
        train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))


def test_resume_refuses_a_different_model_and_allows_a_longer_schedule(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(UserError, match=r"n_layer \(2 -> 3\)"):
        train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume", "--n_layer=3"))
    capsys.readouterr()
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))
    assert "max_iters (2 -> 4)" in capsys.readouterr().out
    assert os.path.basename(find_checkpoint(out)) == "ckpt-0000004"
    assert sorted(step_losses(out)) == [0, 1, 2, 3]


def test_loss_decreases(char_data, tmp_path):
    """150 steps on tiny-shakespeare characters (about a second): the val loss falls from ln(vocab) to well below
    the unigram entropy of the training text, so the model has learned more than character frequencies."""
    out = str(tmp_path / "out")
    extra = ["--max_iters=150", "--eval_interval=150", "--lr_decay_iters=150", "--warmup_iters=5", "--dropout=0.0"]
    train.main(
        args(char_data, out, *extra, "--learning_rate=1e-2", "--min_lr=1e-3", "--batch_size=16", "--eval_iters=8")
    )
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 150]

    with open(os.path.join(char_data, "tiny_char", "meta.json")) as f:
        meta = json.load(f)
    tokens = np.fromfile(os.path.join(char_data, "tiny_char", "train.bin"), dtype=meta["dtype"])
    p = np.bincount(tokens, minlength=meta["vocab_size"]) / len(tokens)
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    # near-uniform logits at init: ln of the model's vocabulary (the dataset's, rounded up to a multiple of 64)
    model_vocab = read_meta(find_checkpoint(out))["model_config"]["vocab_size"]
    assert model_vocab == -(-meta["vocab_size"] // 64) * 64
    assert evals[0]["val_loss"] == pytest.approx(math.log(model_vocab), abs=0.1)
    assert evals[-1]["val_loss"] < unigram_entropy - 0.3
    losses = step_losses(out)
    assert losses[0] == pytest.approx(math.log(model_vocab), abs=0.1)
    assert np.mean([losses[i] for i in range(140, 150)]) < losses[0] - 1.0


def test_wandb_offline_writes_a_run(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2", "--wandb_log=True", "--wandb_run_name=t"))
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = os.listdir(tmp_path / "wandb" / runs[0])
    assert any(f.endswith(".wandb") for f in files)


def test_bfloat16_autocast_on_cpu_trains(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4", "--dtype=bfloat16"))
    assert "on cpu, bfloat16" in capsys.readouterr().out
    losses = step_losses(out)
    assert sorted(losses) == [0, 1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    weights = final_weights(out)
    assert all(t.dtype == torch.float32 for t in weights.values())  # parameters stay float32 under autocast


def test_fine_tune_from_a_hugging_face_directory_then_resume(char_data, tmp_path):
    """--init_from=<HF dir> trains from those weights (the first loss is the pretrained model's), and the same
    command with --init_from=resume continues, although the architecture came from the directory."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(hf_dir)
    out = tmp_path / "out"
    base = [
        f"--data_root={char_data}",
        "--dataset=tiny_char",
        f"--out_dir={out}",
        "--device=cpu",
        "--compile=False",
        "--block_size=16",
        "--batch_size=4",
        "--gradient_accumulation_steps=1",
        "--eval_iters=2",
    ]
    assert train.main([*base, f"--init_from={hf_dir}", "--max_iters=4", "--eval_interval=4"]) == 0
    meta = read_meta(find_checkpoint(str(out)))
    assert meta["model_config"]["n_embd"] == 32 and meta["model_config"]["block_size"] == 16  # cropped to 16
    assert train.main([*base, "--init_from=resume", "--max_iters=6", "--eval_interval=2"]) == 0
    assert read_meta(find_checkpoint(str(out)))["iter_num"] == 6


def test_resume_follows_the_new_learning_rate_not_the_saved_one(char_data, tmp_path, capsys):
    """The optimizer state comes back, its hyperparameters do not: a resume with a tiny learning rate barely moves
    the weights (the saved base learning rate of 3e-3 would move them by ~1e-3 a step)."""
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=8", "--eval_interval=8", "--dropout=0.0"))
    before = final_weights(out)
    train.main(
        args(
            char_data,
            out,
            "--max_iters=12",
            "--eval_interval=12",
            "--dropout=0.0",
            "--init_from=resume",
            "--learning_rate=1e-12",
            "--min_lr=1e-12",
            "--weight_decay=0.5",
        )
    )
    assert "resuming with changed max_iters (8 -> 12), learning_rate (0.003 -> 1e-12)" in capsys.readouterr().out
    after = final_weights(out)
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-9
    assert [r["lr"] for r in records(out) if "lr" in r and r["iter"] >= 8] == [pytest.approx(1e-12)] * 4


class NaNLossGPT(train.GPT):
    """A model whose training loss is NaN: every gradient is non-finite."""

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = super().forward(idx, targets, **kwargs)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_steps_stop_the_run_also_under_loss_scaling(char_data, tmp_path, monkeypatch, capsys, dtype):
    """float16's GradScaler skips a non-finite step by itself; those skips used to go uncounted, so a run of NaN
    weights trained on forever. (float16 on CPU is only allowed here, to reach the GradScaler path.)"""
    from engine import runtime

    if dtype == "float16":
        monkeypatch.setattr(runtime, "pick_dtype", lambda requested, device_type, training=False: torch.float16)
    monkeypatch.setattr(train, "GPT", NaNLossGPT)
    guard = ["--max_iters=20", "--max_nonfinite_steps=3", "--max_rollbacks=0"]  # the guard alone
    code = train.main(args(char_data, str(tmp_path / "out"), *guard))
    assert code == 3
    out = capsys.readouterr().out
    assert "stopping: 3 non-finite steps in a row at iteration 3" in out


def test_auto_dtype_uses_float16_where_bf16_is_only_emulated(monkeypatch):
    from engine import runtime

    # a V100 or T4: bf16 "supported" through emulation only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.pick_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert runtime.pick_dtype("auto", "cuda") == torch.bfloat16


def test_auto_dtype_trains_in_bf16_on_cpus_that_multiply_it_natively(char_data, tmp_path, monkeypatch, capsys):
    """AMX CPUs train in bf16 (their bf16 matmuls run ~2x faster); sampling and evaluation stay float32 there, and
    CPUs without AMX keep float32 throughout."""
    from engine import runtime

    assert isinstance(runtime.native_bf16_cpu(), bool)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    assert runtime.pick_dtype("auto", "cpu", training=True) == torch.float32
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)
    assert runtime.pick_dtype("auto", "cpu", training=True) == torch.bfloat16
    assert runtime.pick_dtype("auto", "cpu") == torch.float32  # inference
    assert runtime.pick_dtype("float32", "cpu", training=True) == torch.float32
    assert train.main(args(char_data, str(tmp_path / "out"), "--max_iters=4", "--dtype=auto")) in (0, None)
    out = capsys.readouterr().out
    assert "on cpu, bfloat16;" in out
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "out") if "loss" in r)


def test_auto_dtype_under_torchrun_is_bf16_only_where_every_cpu_has_amx(monkeypatch):
    """A job over CPUs of different kinds trains in one dtype: the ranks agree on the lowest common choice."""
    import torch.distributed as dist

    from engine import runtime

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)  # this rank has AMX
    real_all_reduce = dist.all_reduce

    def another_rank_without_amx(tensor, op):
        real_all_reduce(tensor, op=op)
        tensor.zero_()  # what MIN gives when one rank contributes 0

    for all_reduce, expected in ((real_all_reduce, torch.bfloat16), (another_rank_without_amx, torch.float32)):
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        rt = runtime.setup_runtime("cpu", "auto", training=True)
        runtime.teardown_runtime(rt)
        assert rt.ddp and rt.dtype == expected


def test_lr_decay_iters_none_decays_by_max_iters(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=8", "--eval_interval=8", "--lr_decay_iters=none"))
    lrs = {r["iter"]: r["lr"] for r in records(out) if "lr" in r}
    assert lrs == {i: pytest.approx(lr_at(i, 3e-3, 4, 8, 3e-4)) for i in range(8)}


def test_missing_wandb_is_one_line(char_data, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        train.main(args(char_data, str(tmp_path / "out"), "--max_iters=2", "--wandb_log=True"))


def test_muon_on_a_torch_without_it_is_refused(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(ValueError, match="torch >= 2.9"):
        train.TrainConfig(optimizer="muon")


def test_fp8_leaves_out_routers_odd_shapes_and_the_head():
    linear = torch.nn.Linear
    assert fp8_eligible(linear(64, 256), "transformer.h.0.mlp.c_fc")
    assert not fp8_eligible(linear(64, 8), "transformer.h.0.mlp.router")
    assert not fp8_eligible(linear(64, 65), "transformer.h.0.attn.c_attn")  # 65 is not a multiple of 16
    assert not fp8_eligible(linear(64, 64), "lm_head")


def test_an_optimizer_state_that_does_not_fit_is_a_one_line_error(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4"))
    path = find_checkpoint(out)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    state["optimizers"][0]["state"]["transformer.no.such.weight"] = state["optimizers"][0]["state"].popitem()[1]
    # rewrite it as a valid checkpoint (hashes and all) holding the mismatched state
    from engine.checkpoint import load_file, save_checkpoint

    weights = load_file(os.path.join(path, "model.safetensors"))
    meta = read_meta(path)
    save_checkpoint(str(tmp_path / "other"), 4, weights, state, meta)
    with pytest.raises(UserError, match="does not fit this optimizer"):
        train.main(args(char_data, str(tmp_path / "other"), "--max_iters=6", "--init_from=resume"))


def test_running_out_of_cpu_memory_is_one_line(char_data, tmp_path, monkeypatch):
    import model as model_module

    def starved(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: 1 bytes")

    monkeypatch.setattr(model_module.F, "cross_entropy", starved)
    with pytest.raises(UserError, match="out of memory on cpu with batch_size=4"):
        train.main(args(char_data, tmp_path / "out", "--max_iters=2", "--eval_interval=100"))


def test_a_run_that_leaves_the_gpt2_recipe_defaults_in_place_gets_a_note(char_data, tmp_path, capsys):
    base = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    small = ["--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--eval_iters=1"]
    train.main([*base, *small, "--max_iters=0"])  # gradient_accumulation_steps left at GPT-2's 40
    out = capsys.readouterr().out
    assert "note: gradient_accumulation_steps=40 is the default (GPT-2 on OpenWebText)" in out
    assert "dataset=" not in out.split("note:")[1].split("\n")[0]  # the dataset was given
    train.main([*base, *small, "--max_iters=0", "--gradient_accumulation_steps=1", "--out_dir=" + str(tmp_path / "b")])
    assert "note: " not in "".join(line for line in capsys.readouterr().out.splitlines() if "default" in line)
