"""A failed command changes nothing: exit 2 means no file created, changed or removed, in the run's directory or
around it. Driven through train.py as a subprocess, with a snapshot of every file before and after."""

import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import assert_user_error, run
from test_train import args

import train
from engine.errors import UserError


def snapshot(root) -> dict[str, str]:
    """Every file under root (the data, the run and what is beside them) by path: its sha256."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def trained_run(char_data, tmp_path) -> list[str]:
    """A finished run of 4 iterations (train.py's arguments to continue it)."""
    command = args(char_data, str(tmp_path / "out"), "--max_iters=4", "--eval_interval=2")
    train.main(command)
    return command


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init_from=resume", "--eval_task=choice", "--eval_task_file=no_such_items.jsonl"], "no_such_items.jsonl"),
        (["--eval_only=True"], "evaluate them with --init_from=resume"),
        (["--init_from=resume", "--max_iters=6", "--n_layer=3"], "n_layer"),
    ],
    ids=["bad task file on resume", "eval_only of a random model into a run", "resume into another model"],
)
def test_a_refused_command_leaves_every_file_as_it_was(trained_run, tmp_path, extra, message):
    before = snapshot(tmp_path)
    assert_user_error(run("train.py", *trained_run, *extra), message)
    assert snapshot(tmp_path) == before


# Settings that fail late (after the lock is taken, the data read, the checkpoint found), each with the values that
# make them fail: generated resumes of a finished run, every refusal compared against a snapshot of everything.
LATE = {
    "n_layer": ["3", "7"],
    "n_embd": ["48"],
    "block_size": ["4096"],
    "dataset": ["no_such_dataset", "../tiny_char"],
    "init_from": ["resume_typo", "/nonexistent/hf_dir"],
    "ema_decay": ["0.99"],
    "optimizer": ["muon", "sgd"],
    "eval_task_file": ["missing.jsonl"],
    "vocab_size": ["10"],
    "batch_size": ["0", "-3"],
    "checkpoint": ["newest"],
}


@settings(derandomize=True, deadline=None, max_examples=30, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from([(k, v) for k, vs in LATE.items() for v in vs]), min_size=1, max_size=3))
def test_a_resume_refused_for_any_reason_leaves_every_file_as_it_was(trained_run, tmp_path, changes):
    task = ["--eval_task=choice"] if any(k == "eval_task_file" for k, _ in changes) else []
    resume = ["--init_from=resume"] if not any(k == "init_from" for k, _ in changes) else []
    before = snapshot(tmp_path)
    try:
        train.main([*trained_run, *resume, *task, *(f"--{k}={v}" for k, v in changes)])
    except (UserError, SystemExit) as e:
        assert not isinstance(e, SystemExit) or e.code == 2
    else:
        return  # a combination that is fine after all: nothing to compare
    assert snapshot(tmp_path) == before
