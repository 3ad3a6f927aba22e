"""Reliability: preemption signals, the non-finite guard, crashes at any moment, and files that carry code."""

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_TRAIN

import sample
import train
from engine import checkpoint, out_dir_lock, run_log
from engine.errors import EXIT_NONFINITE, EXIT_PREEMPTED, UserError

TINY = [*TINY_TRAIN, "--warmup_iters=2", "--lr_decay_iters=1000"]
DEBRIS = re.compile(r"^(?:\.tmp-ckpt-\d+(?:-r\d+)?-|\.old-ckpt-\d+(?:-r\d+)?-|\.loss_curve\.png\.tmp-)(\d+)")  # pid


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


def wait_until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not get there"
        time.sleep(0.05)


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
            "--max_rollbacks=0",  # the guard alone (rollback has its own tests)
            "--warmup_iters=0",
            "--grad_clip=0",
        )
    )
    assert code == EXIT_NONFINITE
    text = capsys.readouterr().out
    assert "non-finite gradient norm, step skipped" in text and "stopping: 4 non-finite steps in a row" in text
    assert "the weights diverged (the loss is not finite either): lower --learning_rate (now 1e+30)" in text
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
    """20 kill -9s and Ctrl-Cs at random moments of a run that checkpoints every iteration: after each, the newest
    verified checkpoint loads in sample.py, training resumes from it, and the next start clears the debris."""
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
        # and only once a checkpoint exists: a kill before the first one leaves none, rightly so
        wait_until(lambda: checkpoint.list_checkpoints(out), proc)
        leftovers = [m for m in map(DEBRIS.match, os.listdir(out)) if m and int(m.group(1)) != proc.pid]
        assert not leftovers, [m.group(0) for m in leftovers]  # what the killed run left is gone
        time.sleep(rng.uniform(0.0, 0.5))
        if i % 2:
            proc.send_signal(signal.SIGINT)
            assert proc.wait() == 130
        else:
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


def test_a_second_writer_is_refused_naming_the_first(char_data, tmp_path):
    out = str(tmp_path / "out")
    holder = out_dir_lock.OutDirLock(out)  # what a running train.py holds
    try:
        with pytest.raises(UserError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    finally:
        holder.release()
    assert not os.path.exists(out) or os.listdir(out) == []  # the refused run wrote nothing
    assert train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2")) == 0
    assert not os.path.exists(os.path.join(out, out_dir_lock.LOCK_NAME))  # let go at the end


def test_the_lock_of_a_killed_run_is_taken_over(char_data, tmp_path):
    out = str(tmp_path / "out")
    code = f"import sys; from engine import out_dir_lock; out_dir_lock.OutDirLock({out!r}); print('locked', flush=True)"
    code += "; sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"  # the event: the lock is held
    with pytest.raises(UserError, match=f"pid {proc.pid} on"):
        train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    proc.kill()  # kill -9: no chance to clean up; the kernel drops the flock
    proc.wait()
    assert os.path.exists(os.path.join(out, out_dir_lock.LOCK_NAME))  # the stale file is still there
    assert train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2")) == 0


def test_resume_drops_the_metrics_logged_after_its_checkpoint(char_data, tmp_path):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=6", "--eval_interval=4", "--log_interval=1"))

    shutil.rmtree(os.path.join(out, "ckpt-0000006"))  # as if the run had died before saving iteration 6
    assert train.main(args(char_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=4")) == 0
    rows = metrics(out)
    assert [r["iter"] for r in rows if "loss" in r] == list(range(6))
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 4, 6]


def test_pruning_never_deletes_through_a_symlink(char_data, tmp_path):
    other = str(tmp_path / "other")
    train.main(args(char_data, other, "--max_iters=2", "--eval_interval=2"))
    theirs = checkpoint.find_checkpoint(other)
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=2"))
    link = os.path.join(out, "ckpt-0000001")
    os.symlink(theirs, link)  # a link to another run's checkpoint, the oldest here
    resume = args(char_data, out, "--init_from=resume", "--max_iters=12", "--eval_interval=4", "--keep_last=1")
    train.main([*resume, "--always_save_checkpoint=True"])
    assert checkpoint.find_checkpoint(out, "best") != link  # so pruning had reason to delete it
    assert checkpoint.verify_checkpoint(theirs) is None  # the other run's checkpoint is whole
    assert os.path.islink(link)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    before = checkpoint.find_checkpoint(out)

    def full(*a, **k):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil_usage(free=0))
    with pytest.raises(UserError, match=f"disk full at {out}: checkpoint 4 not written, the previous checkpoint"):
        train.main(args(char_data, out, "--init_from=resume", "--max_iters=4", "--eval_interval=2"))
    monkeypatch.undo()
    assert checkpoint.find_checkpoint(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # nothing half-written left
    metrics(out)  # whole lines


def shutil_usage(free):

    return shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free)


def test_a_metrics_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    run_log.log_metrics(path, {"iter": 0, "loss": 1.0})
    real_write = os.write

    def half(fd, data):  # the disk fills up half-way through the line
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_log.os, "write", half)
    with pytest.raises(OSError):
        run_log.log_metrics(path, {"iter": 1, "loss": 2.0})
    monkeypatch.undo()
    run_log.log_metrics(path, {"iter": 2, "loss": 3.0})
    assert [r["iter"] for r in metrics(str(tmp_path))] == [0, 2]


def test_a_short_metrics_write_is_cut_back_too(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    run_log.log_metrics(path, {"iter": 0, "loss": 1.0})
    real_write = os.write
    monkeypatch.setattr(run_log.os, "write", lambda fd, data: real_write(fd, data[:5]))  # no error, 5 bytes written
    with pytest.raises(OSError):
        run_log.log_metrics(path, {"iter": 1, "loss": 2.0})
    monkeypatch.undo()
    run_log.log_metrics(path, {"iter": 2, "loss": 3.0})
    assert [r["iter"] for r in metrics(str(tmp_path))] == [0, 2]


def test_a_full_disk_for_metrics_mid_run_warns_once_and_training_goes_on(char_data, tmp_path, monkeypatch, capsys):
    """A metrics row that cannot be written must not end the run (and lose the work since the last checkpoint)."""
    out = str(tmp_path / "out")
    real, calls = run_log.log_metrics, [0]

    def fills_up(path, record):  # the disk is full from the 4th row to the 8th
        calls[0] += 1
        if 4 <= calls[0] <= 8:
            raise OSError(28, "No space left on device")
        real(path, record)

    monkeypatch.setattr(run_log, "log_metrics", fills_up)
    assert train.main(args(char_data, out, "--max_iters=8", "--eval_interval=4")) == 0
    assert checkpoint.read_meta(checkpoint.find_checkpoint(out))["iter_num"] == 8
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and "No space left on device); training goes on" in err
    assert calls[0] > 8 and len(metrics(out)) == calls[0] - 5  # the rows after the disk freed up are written


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_without_a_traceback(char_data, tmp_path):
    out = str(tmp_path / "out")
    proc = start(args(char_data, out, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"))
    wait_for_iterations(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert "Traceback" not in log
    stopped_at = checkpoint.read_meta(checkpoint.find_checkpoint(out))["iter_num"]
    assert stopped_at >= 3 and f"saving iteration {stopped_at}" in log


def test_a_second_ctrl_c_stops_at_once_in_one_line(capsys):
    from engine.errors import run_cli
    from engine.runtime import StopSignals

    stop = StopSignals()
    try:
        signal.raise_signal(signal.SIGINT)  # the first: a flag, the loop saves after its step
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second: now
    finally:
        stop.restore()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: interrupted")


def test_a_prepare_that_fails_half_way_leaves_the_old_dataset(char_data):
    import numpy as np
    import shakespeare_char
    from token_writer import DatasetWriter

    d = os.path.join(char_data, "tiny_char")
    before = {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)}

    def crashing():  # a tokenizer that dies after its first chunk
        yield np.arange(10)
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError), DatasetWriter(d) as writer:
        writer.write_split("train", crashing(), 65)
    assert {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)} == before
    with open(os.path.join(d, "train.bin.tmp-99999999"), "wb") as f:  # what a prepare killed with -9 left
        f.write(b"\0" * 100)
    shakespeare_char.main([f"--out={d}"])
    assert sorted(os.listdir(d)) == sorted(before)


def test_a_run_that_never_had_a_finite_step_is_not_blamed_on_the_learning_rate(
    char_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(train.torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan")))
    guard = ["--max_iters=20", "--max_nonfinite_steps=3", "--max_rollbacks=0"]  # the guard alone
    code = train.main(args(char_data, str(tmp_path / "out"), *guard))
    assert code == EXIT_NONFINITE
    stop = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopping:")]
    assert len(stop) == 1 and "not one step of this run was finite, so the data" in stop[0]
    assert "learning_rate" not in stop[0]


def test_resume_does_not_rewrite_the_checkpoint_it_loaded(char_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    keep = ["--eval_interval=2", "--always_save_checkpoint=True"]
    train.main(args(char_data, out, "--max_iters=4", *keep))
    written = []
    real = checkpoint.save_file
    monkeypatch.setattr(
        checkpoint, "save_file", lambda weights, path, **k: (written.append(path), real(weights, path))[1]
    )
    assert train.main(args(char_data, out, "--init_from=resume", "--max_iters=6", *keep)) == 0
    assert [re.search(r"ckpt-(\d+)", p).group(1) for p in written] == ["0000006"]  # only the new one


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(char_data, small_disk):
    out = os.path.join(small_disk, "out")
    run = args(char_data, out, "--max_iters=40", "--eval_interval=1", "--always_save_checkpoint=True", "--keep_last=5")
    with pytest.raises(UserError, match=f"disk full at {out}: checkpoint \\d+ not written, the previous checkpoint"):
        train.main(run)
    kept = checkpoint.find_checkpoint(out)
    assert checkpoint.verify_checkpoint(kept) is None
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-"))]
    metrics(out)  # every line whole
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=3"])
