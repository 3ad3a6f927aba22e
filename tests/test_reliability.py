"""Reliability: preemption signals, the non-finite guard, crashes at any moment, and files that carry code."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_TRAIN

import checkpoint
import sample
import train
from errors import EXIT_NONFINITE, EXIT_PREEMPTED, UserError

TINY = [*TINY_TRAIN, "--warmup_iters=2", "--lr_decay_iters=1000"]


def args(char_data, out, *extra):
    return [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *TINY, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def start(argv, launcher=(sys.executable,)):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [*launcher, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_iterations(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and sum("loss" in r for r in metrics(out)) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError("training did not reach the expected iteration")


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resume_continues(char_data, tmp_path):
    out = str(tmp_path / "out")
    proc = start(args(char_data, out, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"))
    wait_for_iterations(out, 3, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode == EXIT_PREEMPTED, log
    assert elapsed < 30
    saved = checkpoint.find_checkpoint(out)
    stopped_at = checkpoint.read_meta(saved)["iter_num"]
    assert f"saving iteration {stopped_at}" in log
    assert (
        train.main(
            args(char_data, out, "--init_from=resume", f"--max_iters={stopped_at + 3}", "--eval_interval=100000")
        )
        == 0
    )
    assert checkpoint.read_meta(checkpoint.find_checkpoint(out))["iter_num"] == stopped_at + 3


@pytest.mark.slow
def test_sigterm_under_torchrun_two_ranks(char_data, tmp_path):
    out = str(tmp_path / "out")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = start(
        args(char_data, out, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"), launcher=launcher
    )
    wait_for_iterations(out, 3, proc, timeout=180)
    t0 = time.time()
    for child in _children(proc.pid):  # what SLURM does: signal every task
        os.kill(child, signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert "saving iteration" in log, log
    # both ranks left through the preemption path (torchrun reports a non-zero exit of its workers)
    assert proc.returncode != 0
    saved = checkpoint.find_checkpoint(out)
    stopped_at = checkpoint.read_meta(saved)["iter_num"]
    assert (
        train.main(
            args(char_data, out, "--init_from=resume", f"--max_iters={stopped_at + 2}", "--eval_interval=100000")
        )
        == 0
    )


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_nonfinite_steps_are_skipped_then_training_stops(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    # A huge learning rate makes the weights overflow; every later gradient is NaN.
    code = train.main(
        args(
            char_data,
            out,
            "--learning_rate=1e30",
            "--max_iters=50",
            "--eval_interval=1",
            "--max_nonfinite_steps=4",
            "--warmup_iters=0",
            "--grad_clip=0",
        )
    )
    assert code == EXIT_NONFINITE
    text = capsys.readouterr().out
    assert "non-finite gradient norm, step skipped" in text and "stopping: 4 non-finite steps in a row" in text
    assert max(r.get("skipped_steps", 0) for r in metrics(out)) >= 4
    for path in checkpoint.list_checkpoints(out):  # whatever was saved holds finite weights
        model = _load(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _load(path):
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(**checkpoint.read_meta(path)["model_config"]))
    checkpoint.load_weights(path, model)
    return model


def test_crash_inside_a_save_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2"))
    before = checkpoint.find_checkpoint(out)

    class Crash(BaseException):
        pass

    def crash(*a, **k):
        raise Crash  # the process dies half-way through writing the checkpoint directory

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(Crash):
        train.main(args(char_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
    monkeypatch.undo()
    assert checkpoint.find_checkpoint(out) == before
    assert any(name.startswith(".tmp-ckpt-") for name in os.listdir(out))  # the half-written one is not listed
    assert train.main(args(char_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2")) == 0


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_usable_checkpoint(char_data, tmp_path, capsys):
    """20 kill -9s at random moments of a run that checkpoints every iteration: after each, the newest verified
    checkpoint loads in sample.py and training resumes from it."""
    out = str(tmp_path / "out")
    rng = random.Random(0)
    run = args(
        char_data, out, "--max_iters=100000", "--eval_interval=1", "--eval_iters=1", "--log_interval=1", "--keep_last=1"
    )
    usable = 0
    for i in range(20):
        proc = start(run + (["--init_from=resume"] if checkpoint.list_checkpoints(out) else []))
        done = sum("loss" in r for r in metrics(out)) if i else 0
        wait_for_iterations(out, done + 1, proc)  # kill while training and saving, not while importing torch
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        path = checkpoint.find_checkpoint(out)
        sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=3"])
        usable += 1
        assert checkpoint.verify_checkpoint(path) is None
    assert usable == 20
    final = checkpoint.read_meta(checkpoint.find_checkpoint(out))["iter_num"]
    assert train.main(args(char_data, out, "--init_from=resume", f"--max_iters={final + 1}")) == 0
    capsys.readouterr()


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors", "meta.json"])
def test_a_pickle_payload_in_a_checkpoint_executes_nothing(char_data, tmp_path, victim):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    path = checkpoint.find_checkpoint(out)
    marker = tmp_path / "pwned"
    with open(os.path.join(path, victim), "wb") as f:
        pickle.dump(Payload(marker), f)
    # The attacker also rewrites COMPLETE so the checksums match.
    hashes = {name: checkpoint._sha256(os.path.join(path, name)) for name in checkpoint._FILES}
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump(hashes, f)
    with pytest.raises(UserError):
        train.main(args(char_data, out, "--init_from=resume", "--max_iters=4"))
    if victim == "state.pt":  # sampling never reads the optimizer state
        sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=2", "--num_samples=1"])
    else:
        with pytest.raises(UserError):
            sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=2"])
    assert not marker.exists()
