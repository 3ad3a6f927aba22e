"""Ctrl-C at any moment is one line on stderr and exit code 130, and changes no file; a killed prepare leaves no
worker behind (engine/interrupts.py).

The real entry scripts run as subprocesses. A moment to interrupt is reached by holding the process there: a
sitecustomize module (HOOK, imported by Python at start-up from PYTHONPATH) creates a marker file and sleeps at that
moment, the test waits for the marker, then signals. Nothing waits on the clock; the bounds are only hang guards.
"""

import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import text
from conftest import ROOT, needs_gpt2_tokenizer
from test_reliability import args

import sample
from engine import checkpoint, interrupts

INTERRUPTED = [f"error: {interrupts.MESSAGE}"]  # the whole of stderr after a Ctrl-C
QUIET = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # no progress bars
HOOK = '''
"""Holds this process at the moment HOLD_AT names: creates the file HOLD_MARKER, then sleeps until a signal comes."""
import atexit
import os
import signal
import sys
import threading
import time


def hold():
    open(os.environ["HOLD_MARKER"], "w").close()
    time.sleep(3600)


class HoldFirstHeavyImport:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "torch", "engine.configurator"):
            sys.meta_path.remove(self)
            hold()
        return None


def busy():
    """Matrix products without end: a thread inside C++ code, as train.py's loss-curve thread is inside matplotlib
    while it draws, or gloo's workers under torchrun."""
    import torch

    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)


def first_ctrl_c_taken():
    """Whether train.py's StopSignals (engine/runtime.py) has taken a first Ctrl-C: the next one is the second."""
    stop = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return getattr(stop, "received", None) == signal.SIGINT


def hold_in_checkpoint_fsync():
    fsync = os.fsync

    def held(fd):
        if first_ctrl_c_taken() and os.environ["HOLD_PATH"] in os.readlink(f"/proc/self/fd/{fd}"):
            threading.Thread(target=busy, daemon=True).start()
            hold()
        return fsync(fd)

    os.fsync = held


if os.environ["HOLD_AT"] == "import":
    sys.meta_path.insert(0, HoldFirstHeavyImport())
elif os.environ["HOLD_AT"] == "save":
    hold_in_checkpoint_fsync()
elif os.environ["HOLD_AT"] == "exit":  # the first registered: the last to run as the process ends
    atexit.register(hold)
'''


def entry_scripts() -> list[str]:
    """Every script a user runs: the root's, tools/, prepare/ and bench/."""
    scripts = ["train.py", "sample.py"]
    for folder in ("tools", "prepare", "bench"):
        scripts += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, folder, "*.py")))
    return [
        s for s in scripts if os.path.basename(s) not in ("__init__.py", "token_writer.py", "table.py")
    ]  # (modules)


def run(tmp_path, argv: list[str], env: dict, **popen) -> subprocess.Popen:
    """`python <argv>`, its stdout and stderr going to files (a pipe would stay open as long as any worker lives)."""
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen(
            [sys.executable, *argv], env=dict(os.environ, **QUIET, **env), stdout=out, stderr=err, **popen
        )


def ended(proc: subprocess.Popen, tmp_path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) once the process has ended."""
    code = proc.wait(timeout=300)  # a hang guard
    return code, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def start_held(tmp_path, at: str, argv: list[str], env: dict | None = None, **popen) -> tuple:
    """(process, marker): `python <argv>` that holds at `at` once the marker file exists."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    marker = tmp_path / f"held-{at}"
    env = {**(env or {}), "PYTHONPATH": str(hook), "HOLD_AT": at, "HOLD_MARKER": str(marker)}
    return run(tmp_path, argv, env, **popen), marker


def wait_until(condition, proc, what: str, bound: float = 300) -> None:
    """Poll until condition() holds; the process ending first, or the hang guard, fails the test."""
    deadline = time.monotonic() + bound
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended (exit code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"hang guard: never {what}"
        time.sleep(0.02)


def snapshot(*roots) -> dict[str, str]:
    """The sha256 of every file under the roots, hidden ones included, by path."""
    files = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        found += children
        todo += children
    return found


def gone(pid: int) -> bool:
    """Whether a process has ended: it no longer exists, or is a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("script", entry_scripts())
def test_ctrl_c_while_importing_is_one_line(script, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc, marker = start_held(tmp_path, "import", [os.path.join(ROOT, script)], cwd=work)
    wait_until(marker.exists, proc, "importing numpy, torch or engine.configurator")
    proc.send_signal(signal.SIGINT)
    code, out, err = ended(proc, tmp_path)
    assert (code, err.splitlines(), out) == (interrupts.EXIT_INTERRUPTED, INTERRUPTED, "")
    assert snapshot(work) == {}  # nothing written where it ran


FINALIZER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from engine.errors import run_cli


class Finalized:
    def __del__(self):  # Ctrl-C arrives while Python runs a finalizer: the interrupt cannot leave it
        os.kill(os.getpid(), signal.SIGINT)


def main():
    Finalized()
    print("carried on as if Ctrl-C had not been pressed")


if __name__ == "__main__":
    run_cli(main)
"""


def test_ctrl_c_that_lands_in_a_finalizer_still_stops(tmp_path):
    (tmp_path / "script.py").write_text(FINALIZER)
    code, out, err = ended(run(tmp_path, [str(tmp_path / "script.py"), ROOT], {}), tmp_path)
    assert (code, err.splitlines(), out) == (interrupts.EXIT_INTERRUPTED, INTERRUPTED, "")


@pytest.fixture
def corpus(tmp_path) -> str:
    """A JSON Lines corpus that takes 2 processes some seconds to tokenize (60,000 short documents)."""
    rng = random.Random(0)
    words = "the king and queen of rome speak now what yes thou art my lord good night sweet prince".split()
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(60_000):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 40)))}) + "\n")
    return str(path)


def start_tokenizing(tmp_path, corpus) -> tuple:
    """(process, its dataset directory, the files there before): prepare/text.py over `corpus` with 2 tokenizing
    processes, once a previous dataset is in place, held until both workers have started."""
    out = tmp_path / "data"
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"an older document, number {i}"}) + "\n" for i in range(50)))
    text.main([f"--input={small}", f"--out={out}", "--num_proc=1", f"--cache_dir={tmp_path / 'cache0'}"])
    before = snapshot(out)
    argv = [os.path.join(ROOT, "prepare", "text.py"), f"--input={corpus}", f"--out={out}", "--num_proc=2"]
    argv.append(f"--cache_dir={tmp_path / 'cache'}")  # a new cache: the documents are tokenized, not read back
    proc = run(tmp_path, argv, {}, start_new_session=True)  # its process group is what a terminal's Ctrl-C reaches
    wait_until(lambda: len(descendants(proc.pid)) >= 2, proc, "the tokenizing processes started")
    return proc, out, before


@pytest.mark.slow
@needs_gpt2_tokenizer
def test_ctrl_c_while_tokenizing_in_processes_is_one_line_and_keeps_the_dataset(tmp_path, corpus):
    proc, out, before = start_tokenizing(tmp_path, corpus)
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the parent and its workers
    code, stdout, err = ended(proc, tmp_path)
    assert (code, err.splitlines()) == (interrupts.EXIT_INTERRUPTED, INTERRUPTED), stdout[-2000:]
    assert snapshot(out) == before  # the previous dataset as it was, and no staging left beside it
    assert all(gone(pid) for pid in workers)


@pytest.mark.slow
@needs_gpt2_tokenizer
def test_kill_9_of_prepare_leaves_no_worker_behind(tmp_path, corpus):
    proc, out, before = start_tokenizing(tmp_path, corpus)
    workers = descendants(proc.pid)
    proc.kill()
    proc.wait()
    try:
        wait_until(lambda: all(gone(pid) for pid in workers), None, "the workers ended", bound=60)
    finally:
        for pid in workers:  # (old code: they would live on)
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    kept = {path: sha for path, sha in snapshot(out).items() if os.path.dirname(path) == str(out)}
    assert kept == before  # the previous dataset as it was (what was staged is cleared by the next prepare)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["save", "exit"])
def test_a_second_ctrl_c_is_one_line_and_keeps_the_newest_checkpoint(char_data, tmp_path, moment):
    """The first Ctrl-C asks for a checkpoint; the second comes while a checkpoint is being written (with another
    thread inside C++ code, as the loss-curve thread often is) or while the process ends (exit code 130 already)."""
    out = str(tmp_path / "out")
    argv = [os.path.join(ROOT, "train.py"), *args(char_data, out, "--max_iters=100000", "--eval_interval=2")]
    proc, marker = start_held(tmp_path, moment, argv, {"HOLD_PATH": f"{os.sep}.tmp-ckpt"}, cwd=tmp_path)
    wait_until(lambda: checkpoint.list_checkpoints(out), proc, "a checkpoint was written")
    complete = {path: snapshot(path) for path in checkpoint.list_checkpoints(out)}
    proc.send_signal(signal.SIGINT)  # held at the next checkpoint write once it is taken, or as the process ends
    wait_until(marker.exists, proc, f"holding at {moment}")
    proc.send_signal(signal.SIGINT)
    code, stdout, err = ended(proc, tmp_path)
    assert (code, err.splitlines()) == (interrupts.EXIT_INTERRUPTED, INTERRUPTED), stdout[-2000:]
    for path in checkpoint.list_checkpoints(out):  # whole, and those that were there unchanged
        assert checkpoint.verify_checkpoint(path) is None
        assert snapshot(path) == complete.get(path, snapshot(path))
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=3"])
