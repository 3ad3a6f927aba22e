"""Class 4 of "Nothing lost, by construction": a full disk anywhere is one line and loses nothing.

Each entry point writes onto a real, full filesystem (a small tmpfs filled to the last byte) and must end with exit
code 2, one `error:` line, and every file as it was: the run, the dataset, the earlier outputs. Mid-run, a metrics row
that cannot be written is warned about once and training goes on (tests/test_reliability.py). Needs the right to mount
a tmpfs (root in a container); without it the module is skipped and the simulated failures of
tests/test_reliability.py and tests/test_data.py still run."""

import errno
import os
import re

import pytest
from test_bad_inputs import assert_user_error, run
from test_train import args
from test_writes_stay_inside import snapshot

import train

FILLER = "filler"


def fill(disk: str) -> None:
    """Write a filler file until not one more byte fits."""
    fd = os.open(os.path.join(disk, FILLER), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def assert_one_line(result, *fragments: str) -> None:
    """assert_user_error, the prepare scripts' progress bars (tqdm's lines on stderr) left aside."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    result.stderr = "\n".join(lines) + "\n"
    assert_user_error(result, *fragments)


def unchanged(disk: str, before: dict) -> None:
    assert {k: v for k, v in snapshot(disk).items() if k != FILLER} == before


@pytest.fixture
def trained_on_disk(char_data, small_disk) -> tuple[str, list[str]]:
    """A finished 2-iteration run on the small disk (train.py's arguments), its lock left behind as kill -9 leaves
    it: a run that resumes takes it over."""
    out = os.path.join(small_disk, "out")
    command = args(char_data, out, "--max_iters=2", "--eval_interval=2", "--keep_last=1")
    train.main(command)
    with open(os.path.join(out, ".lock"), "w") as f:
        f.write("pid 99999999 on somewhere since long ago")
    return out, command


def test_a_new_run_on_a_full_disk_is_one_line_and_leaves_nothing(char_data, small_disk):
    fill(small_disk)
    before = {k: v for k, v in snapshot(small_disk).items() if k != FILLER}
    result = run("train.py", *args(char_data, os.path.join(small_disk, "out"), "--max_iters=2"))
    assert_user_error(result, "disk full", ".lock")
    unchanged(small_disk, before)


def test_resuming_on_a_full_disk_is_one_line_and_keeps_the_run(trained_on_disk, small_disk):
    """The stale lock's own space takes the new holder's pid; trimming metrics.jsonl (the rows logged past the
    checkpoint) needs a new file, which does not fit."""
    out, command = trained_on_disk
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"iter": 5, "loss": 1.0}\n')  # logged after the checkpoint by a run that then died
    fill(small_disk)
    before = {k: v for k, v in snapshot(small_disk).items() if k not in (FILLER, "out/.lock")}
    result = run("train.py", *command, "--init_from=resume", "--max_iters=4")
    assert_user_error(result, "disk full", "metrics.jsonl")
    assert {k: v for k, v in snapshot(small_disk).items() if k not in (FILLER, "out/.lock")} == before


def test_preparing_onto_a_full_disk_keeps_the_previous_dataset(small_disk, tmp_path):
    data = os.path.join(small_disk, "data")
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be, that is the question\n" * 100)
    assert run("prepare/shakespeare_char.py", f"--out={data}", f"--input={text}").returncode == 0
    text.write_text("another text, another vocabulary\n" * 2000)
    fill(small_disk)
    before = {k: v for k, v in snapshot(small_disk).items() if k != FILLER}
    assert_one_line(run("prepare/shakespeare_char.py", f"--out={data}", f"--input={text}"), "disk full")
    unchanged(small_disk, before)


@pytest.mark.parametrize(
    "tool, flags",
    [
        ("tools/export_hf.py", ["--hf_dir={disk}/hf"]),
        ("tools/evaluate.py", ["--tokens={data}/tiny_char/val.bin", "--max_tokens=40", "--surprisal={disk}/s.jsonl"]),
        ("tools/attention.py", ["--start=to be", "--png={disk}/attn.png"]),
    ],
    ids=["export", "surprisal", "attention"],
)
def test_an_output_onto_a_full_disk_is_one_line_and_nothing_is_left(char_data, small_disk, tmp_path, tool, flags):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    fill(small_disk)
    before = {k: v for k, v in snapshot(small_disk).items() if k != FILLER}
    flags = [f.format(disk=small_disk, data=char_data) for f in flags]
    assert_user_error(run(tool, f"--out_dir={out}", *flags), "disk full")
    unchanged(small_disk, before)
