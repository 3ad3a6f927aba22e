"""A failed command changes nothing: exit 2 means no file created, changed or removed, in the run's directory or
around it. Driven through train.py as a subprocess, with a snapshot of every file before and after."""

import hashlib
import os

import pytest
from test_bad_inputs import assert_user_error, run
from test_train import args

import train


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
