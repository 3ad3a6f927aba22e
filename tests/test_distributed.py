"""2-process DDP on CPU (gloo) under torchrun equals one process with the same global batch.

gradient_accumulation_steps is global: 2 on one process is 2 micro-steps, on 2 ranks 1 micro-step each, over the
same data windows. Only the order of float sums differs (DDP averages gradients across ranks), hence the tolerances.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from engine.checkpoint import find_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = [
    "--device=cpu",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=16",
    "--batch_size=4",
    "--eval_iters=2",
    "--log_interval=1",
    "--dropout=0.0",
    "--max_iters=6",
    "--eval_interval=6",
    "--warmup_iters=2",
    "--lr_decay_iters=6",
    "--learning_rate=1e-2",
    "--min_lr=1e-3",
    "--dtype=float32",  # dtype=auto trains in bf16 on CPUs with AMX: float32 makes the comparisons machine-independent
]


def torchrun(tmp_path, *argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """train.py under `torchrun --standalone --nproc_per_node=<nproc>`; each rank's stdout/stderr go to
    tmp_path/logs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [f"--log-dir={tmp_path / 'logs'}", "--redirects=3", "train.py", *argv]
    env = os.environ.copy()  # keeps TIKTOKEN_CACHE_DIR and PATH
    env.pop("RANK", None)
    # Each rank computes with as many threads as the one-process runs the tests compare it with (torchrun would give
    # it 1): intra-op reductions then sum in the same order, and a diverging run (rollback's absurd rates) stays
    # comparable on any machine, whatever its core count
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def rank_logs(tmp_path, stream: str, nproc: int = 2) -> list[str]:
    paths = sorted(glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / "*" / f"{stream}.log")))
    assert len(paths) == nproc, paths
    contents = []
    for path in paths:
        with open(path) as f:
            contents.append(f.read())
    return contents


def records(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_ranks_match_one_process(char_data, tmp_path):
    data = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    data.append("--peak_flops=1e12")  # a stand-in peak, so MFU is reported on CPU
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*data, f"--out_dir={single}"])
    result = torchrun(tmp_path, *data, f"--out_dir={ddp}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    # MFU is per GPU: each of 2 ranks does half the FLOPs of the global batch; the first 5 iterations are left out
    flops = [{r["iter"]: r["mfu"] * r["dt"] for r in records(out) if "mfu" in r} for out in (single, ddp)]
    assert list(flops[0]) == list(flops[1]) == [5]
    assert flops[1][5] == pytest.approx(flops[0][5] / 2, rel=1e-9)
    rank0, rank1 = rank_logs(tmp_path, "stdout")
    assert "# 2 process(es) on cpu" in rank0 and rank1 == ""  # only the master prints

    ours, theirs = records(single), records(ddp)
    assert [r["iter"] for r in ours] == [r["iter"] for r in theirs] == [0, 0, 1, 2, 3, 4, 5, 6]  # master logs once
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)
    assert ours[-2]["loss"] < ours[1]["loss"]  # it trained, so the comparison covers the optimizer steps

    w_single = load_file(os.path.join(find_checkpoint(single), "model.safetensors"))
    w_ddp = load_file(os.path.join(find_checkpoint(ddp), "model.safetensors"))
    assert w_single.keys() == w_ddp.keys()
    for k in w_single:
        torch.testing.assert_close(w_ddp[k], w_single[k], atol=1e-5, rtol=0, msg=k)


def test_accumulation_not_divisible_by_ranks_is_a_one_line_error(char_data, tmp_path):
    out = str(tmp_path / "out")
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}"]
    result = torchrun(tmp_path, *data, *CONFIG, "--gradient_accumulation_steps=3")
    assert result.returncode != 0
    for stderr in rank_logs(tmp_path, "stderr"):
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: gradient_accumulation_steps=3"), stderr
    assert "Traceback" not in "".join(rank_logs(tmp_path, "stderr"))
    assert not os.path.exists(out)


def test_a_locked_out_dir_stops_every_rank_with_one_line(char_data, tmp_path):
    from engine.out_dir_lock import OutDirLock

    out = str(tmp_path / "out")
    holder = OutDirLock(out)  # another run writes there
    try:
        data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}"]
        result = torchrun(tmp_path, *data, *CONFIG, "--gradient_accumulation_steps=2")
    finally:
        holder.release()
    assert result.returncode != 0
    for stderr in rank_logs(tmp_path, "stderr"):  # both ranks stopped, neither waits for the other
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another training run" in lines[0], stderr
