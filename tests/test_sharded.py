"""Sharded checkpoints (engine/sharded_checkpoint.py): under FSDP every rank writes its own shards with
torch.distributed.checkpoint, in the background by default. The anchors: a run saved and resumed across 2 -> 4 -> 2
processes, FSDP -> DDP -> FSDP -> one process gives the losses of one uninterrupted process; the same number of
ranks resumes bit for bit; a kill -9 while a checkpoint is being written leaves the previous one loadable and no
debris after the next start; a hostile index is one line, never code."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import CONFIG, rank_logs, torchrun
from test_reliability import _children

import sample
import train
from engine.checkpoint import (
    find_checkpoint,
    is_sharded,
    list_checkpoints,
    load_newest_model,
    read_meta,
    verify_checkpoint,
)
from engine.errors import UserError
from tools import evaluate, export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def options(char_data, out, *extra) -> list[str]:
    """8 global micro-steps (2 per rank on 4 ranks), a schedule fixed at 10 iterations, a checkpoint every 2."""
    schedule = ["--gradient_accumulation_steps=4", "--lr_decay_iters=10", "--eval_interval=2", "--max_rollbacks=0"]
    return [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG, *schedule, *extra]


def ranks(tmp_path, n: int, *argv: str) -> None:
    result = torchrun(tmp_path, *argv, nproc=n)
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr", n))[-3000:]


def test_a_sharded_checkpoint_resumes_on_any_number_of_processes_in_any_mode(char_data, tmp_path):
    whole = tmp_path / "whole"
    train.main(options(char_data, whole, "--max_iters=10"))
    out = tmp_path / "out"
    ranks(tmp_path / "a", 2, *options(char_data, out, "--max_iters=2", "--fsdp=True", "--async_save=False"))
    assert is_sharded(find_checkpoint(str(out)))
    ranks(tmp_path / "b", 4, *options(char_data, out, "--max_iters=4", "--fsdp=True", "--init_from=resume"))
    ranks(tmp_path / "c", 2, *options(char_data, out, "--max_iters=6", "--init_from=resume"))  # DDP
    assert not is_sharded(find_checkpoint(str(out)))  # DDP writes one file
    ranks(tmp_path / "d", 2, *options(char_data, out, "--max_iters=8", "--fsdp=True", "--init_from=resume"))
    assert is_sharded(find_checkpoint(str(out)))
    assert train.main(options(char_data, out, "--max_iters=10", "--init_from=resume")) == 0  # one process
    expected, resumed = losses(whole), losses(out)
    assert sorted(resumed) == list(range(10))
    assert [resumed[i] for i in range(10)] == pytest.approx([expected[i] for i in range(10)], rel=1e-4, abs=1e-5)


def test_the_same_ranks_resume_a_sharded_checkpoint_bit_for_bit_with_ema(char_data, tmp_path, capsys):
    ema = ("--ema_decay=0.9", "--fsdp=True")
    ranks(tmp_path / "a", 2, *options(char_data, tmp_path / "whole", "--max_iters=6", *ema))
    out = tmp_path / "out"
    ranks(tmp_path / "b", 2, *options(char_data, out, "--max_iters=2", *ema))
    ranks(tmp_path / "c", 2, *options(char_data, out, "--max_iters=6", *ema, "--init_from=resume"))
    assert losses(out) == losses(tmp_path / "whole")
    # one process reads the pieces of every rank: the weights and their average, to sample, score and export
    for weights in ("raw", "ema"):
        sample.main(
            [f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5", "--num_samples=1", f"--weights={weights}"]
        )
    assert capsys.readouterr().out.count("---------------") == 2
    val = os.path.join(char_data, "tiny_char", "val.bin")
    evaluate.main([f"--out_dir={out}", f"--tokens={val}", "--device=cpu", "--max_tokens=200", "--weights=ema"])
    assert "loss" in capsys.readouterr().out
    export_hf.main([f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}", "--weights=ema"])
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    _, model, _ = load_newest_model(str(out), weights="ema")
    assert torch.equal(exported["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.T)


def test_a_kill_during_a_sharded_save_keeps_the_previous_checkpoint_and_leaves_no_debris(char_data, tmp_path):
    """The second checkpoint's writers are stopped just before it is sealed (every shard written, no COMPLETE), and
    every process is killed with SIGKILL there: the first checkpoint loads, and the next start clears the rest."""
    out = tmp_path / "out"
    marker = tmp_path / "sealing"
    script = tmp_path / "stalled_train.py"
    script.write_text(
        "import sys, threading\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import engine.checkpoint as checkpoint, train\n"
        "real = checkpoint._seal\n"
        "def stalled(tmp, names):\n"
        "    if 'ckpt-0000004' in tmp:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        threading.Event().wait()  # until killed\n"
        "    real(tmp, names)\n"
        "checkpoint._seal = stalled\n"
        "sys.exit(train.main())\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    cmd += options(char_data, out, "--max_iters=6", "--fsdp=True")
    env = os.environ.copy()
    env.pop("RANK", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.exists() and proc.poll() is None:  # waits on the marker (or the run ending without one)
        time.sleep(0.05)
    assert marker.exists(), "the run ended before its second checkpoint was sealed"
    workers = _children(proc.pid)  # (torchrun starts each in a session of its own)
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in workers:  # SIGKILL lands when the kernel gets to it: until then a worker still holds out_dir's lock
        while _alive(pid):
            time.sleep(0.01)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["ckpt-0000002"]
    assert verify_checkpoint(str(out / "ckpt-0000002")) is None
    assert any(name.startswith(".tmp-") for name in os.listdir(out))  # the unsealed one, until the next start
    assert train.main(options(char_data, out, "--max_iters=4", "--init_from=resume", "--fsdp=False")) == 0
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))
    assert read_meta(find_checkpoint(str(out)))["iter_num"] == 4


def _alive(pid: int) -> bool:
    """Whether any thread of process pid still runs. A killed process's main thread can be a zombie while another of
    its threads (a checkpoint writer in the middle of a write) is still exiting, and until the last one has, the
    process's files stay open and out_dir's lock held; a zombie with no thread left holds nothing."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except FileNotFoundError:
            continue
    return False


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _forged_index(index: str, how: str, marker) -> None:
    """Rewrite a real DCP index `how`: a pickle that runs a command, a piece outside the shard files, an entry DCP
    would load with a full unpickler."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(os.path.dirname(index)).read_metadata()  # (DCP's own reader: our real file)
    if how == "code":
        metadata = _Hostile(marker)
    elif how == "outside":
        info = next(iter(metadata.storage_data.values()))
        info.relative_path = "../../meta.json"
    else:
        key = next(iter(metadata.state_dict_metadata))
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
    with open(index, "wb") as f:
        pickle.dump(metadata, f)


@pytest.mark.parametrize(
    "how, message",
    [
        ("code", r"UnpicklingError: posix\.system is not part of a checkpoint's index"),
        ("outside", r"a piece is in \.\./\.\./meta\.json, not a shard file"),
        ("bytes", r"BytesStorageMetadata is not part of a checkpoint's index"),
    ],
)
def test_a_hostile_shard_index_is_one_line_and_runs_nothing(char_data, tmp_path, how, message):
    out = tmp_path / "out"
    ranks(tmp_path / "a", 2, *options(char_data, out, "--max_iters=2", "--fsdp=True"))
    path = find_checkpoint(str(out))
    marker = tmp_path / "pwned"
    index = os.path.join(path, "shards", ".metadata")
    _forged_index(index, how, marker)
    complete = os.path.join(path, "COMPLETE")
    with open(complete) as f:
        hashes = json.load(f)
    with open(index, "rb") as f:
        hashes["shards/.metadata"] = hashlib.sha256(f.read()).hexdigest()  # it passes the checksums
    with open(complete, "w") as f:
        json.dump(hashes, f)
    with pytest.raises(UserError, match=message):
        sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5"])
    assert not marker.exists()


def test_a_sharded_checkpoint_missing_a_shard_is_skipped_for_the_one_before(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    ranks(tmp_path / "a", 2, *options(char_data, out, "--max_iters=4", "--fsdp=True"))
    os.remove(out / "ckpt-0000004" / "shards" / "__1_0.distcp")
    assert find_checkpoint(str(out)) == str(out / "ckpt-0000002")
    assert "skipping corrupt checkpoint" in capsys.readouterr().out
    sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5", "--num_samples=1"])
