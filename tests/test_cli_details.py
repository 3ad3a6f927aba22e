"""Small things a user sees: what sample.py loaded, a cropped prompt, where the runs are, file modes, one corpus."""

import os
import stat

import pytest
from conftest import TINY_TRAIN

import sample
import train
from engine.checkpoint import find_checkpoint
from engine.errors import UserError


@pytest.fixture
def run(char_data, tmp_path):
    out = str(tmp_path / "runs" / "out-a")
    train.main([f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *TINY_TRAIN, "--max_iters=2"])
    return out


def test_sample_says_what_it_loaded_and_that_a_long_prompt_is_cropped(run, capsys):
    capsys.readouterr()
    sample.main([f"--out_dir={run}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2", "--start=" + "ab" * 20])
    captured = capsys.readouterr()
    assert f"sampling {find_checkpoint(run)} (iteration 2, val loss " in captured.err
    assert "note: the prompt is 40 tokens; the model sees its last 16" in captured.err
    assert captured.out.startswith("ab" * 20)  # stdout holds only the samples


def test_no_checkpoint_names_the_runs_beside_it(run, tmp_path):
    with pytest.raises(UserError, match="runs with checkpoints beside it: .*out-a"):
        sample.main([f"--out_dir={tmp_path / 'runs' / 'out-typo'}", "--device=cpu"])


def test_checkpoint_and_export_weights_are_readable_like_every_other_file(run, tmp_path):
    from tools import export_hf

    export_hf.main([f"--out_dir={run}", f"--hf_dir={tmp_path / 'hf'}"])
    for path in (os.path.join(find_checkpoint(run), "model.safetensors"), tmp_path / "hf" / "model.safetensors"):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        umask = os.umask(0)
        os.umask(umask)
        assert mode == 0o666 & ~umask, oct(mode)


def test_prepare_shakespeare_reuses_the_text_shakespeare_char_fetched(tmp_path, monkeypatch):
    from conftest import GPT2_AVAILABLE, shakespeare_text

    if not GPT2_AVAILABLE:
        pytest.skip("the GPT-2 tokenizer needs the network or TIKTOKEN_CACHE_DIR with tiktoken's cache files")
    import shakespeare

    monkeypatch.chdir(tmp_path)
    os.makedirs("data/shakespeare_char")
    with open("data/shakespeare_char/input.txt", "w", encoding="utf-8") as f:
        f.write(shakespeare_text(20_000))
    shakespeare.main([])  # offline: a download would fail
    assert os.path.exists("data/shakespeare/train.bin") and not os.path.exists("data/shakespeare/input.txt")


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    """`python tools/plan.py ... | head -3`: the pipe's reader is gone when the command writes: no traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    read, write = os.pipe()
    os.close(read)  # the reader left before the first line (unbuffered: that line's write fails)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, f"{ROOT}/tools/plan.py", "--flops=1e18", "--vocab_size=65"], stdout=write,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)  # fmt: skip
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "") and os.listdir(tmp_path) == []
