"""User errors at the command line: exit code 2 and one line on stderr starting with "error:", never a traceback.

Each case runs the real entry script as a subprocess from the repository root, as a user would.
"""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import save_checkpoint
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = os.environ.copy()  # keeps TIKTOKEN_CACHE_DIR
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def abc_checkpoint(tmp_path_factory) -> str:
    """An out_dir holding one checkpoint of a tiny model over the character vocabulary "abc"."""
    out = tmp_path_factory.mktemp("abc")
    model = GPT(GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=8))
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    meta = {"model_config": dataclasses.asdict(model.config), "train_config": {}, "data": data, "val_loss": 1.0}
    state = {"optimizer": {}, "scaler": {}, "iter_num": 1, "best_val_loss": 1.0}
    save_checkpoint(str(out), 1, model, state, meta)
    return str(out)


TRAIN_CASES = {
    "unknown_key": (["--batch_sise=3"], ["'batch_sise'", "--batch_size"]),
    "bad_int": (["--max_iters=abc"], ["max_iters", "int"]),
    "bad_bool": (["--compile=maybe"], ["compile", "bool"]),
    "no_value": (["--compile"], ["--compile=VALUE"]),
    "missing_preset": (["config/no_such_preset.py"], ["no_such_preset.py", "not found"]),
    "invalid_value": (["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps must be >= 1"]),
    "float16_on_cpu": (["--device=cpu", "--dtype=float16"], ["float16", "CPU"]),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_config_errors(case):
    argv, fragments = TRAIN_CASES[case]
    assert_user_error(run("train.py", *argv), *fragments)


def test_train_missing_dataset_says_to_prepare(tmp_path):
    result = run("train.py", "--device=cpu", f"--data_root={tmp_path}", "--dataset=nope")
    assert_user_error(result, "prepare/text.py --input=<your files>")  # there is no prepare/nope.py to name
    result = run("train.py", "--device=cpu", f"--data_root={tmp_path}", "--dataset=shakespeare_char")
    assert_user_error(result, "python prepare/shakespeare_char.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_cuda_without_cuda():
    assert_user_error(run("train.py", "--device=cuda"), "CUDA is not available")


def test_train_resume_without_checkpoint(char_data, tmp_path):
    out = tmp_path / "empty"
    result = run(
        "train.py",
        "--device=cpu",
        f"--data_root={char_data}",
        "--dataset=tiny_char",
        f"--out_dir={out}",
        "--block_size=16",
        "--init_from=resume",
    )
    assert_user_error(result, "no checkpoint in")


def test_train_vocab_smaller_than_the_dataset(char_data, tmp_path):
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={tmp_path / 'out'}"]
    result = run("train.py", "--device=cpu", *data, "--block_size=16", "--n_layer=1", "--vocab_size=10")
    assert_user_error(result, "vocab_size 10 is smaller than the dataset's")


def test_sample_without_checkpoint(tmp_path):
    assert_user_error(run("sample.py", "--device=cpu", f"--out_dir={tmp_path}"), "no checkpoint in")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--top_p=1.5"], ["top_p"]),
        (["--temperature=-1"], ["temperature"]),
        (["--top_k=0"], ["top_k"]),
        (["--start=FILE:/nonexistent/prompt.txt"], ["/nonexistent/prompt.txt", "not found"]),
        (["--start=abxyz"], ["'xyz'", "vocabulary"]),
        (["--start="], ["prompt is empty"]),
        (["--checkpoint=newest"], ["'newest'", "latest or best"]),
    ],
    ids=["top_p", "temperature", "top_k", "prompt_file", "char_outside_vocab", "empty_prompt", "checkpoint_choice"],
)
def test_sample_errors(abc_checkpoint, argv, fragments):
    assert_user_error(run("sample.py", "--device=cpu", f"--out_dir={abc_checkpoint}", *argv), *fragments)


def test_sample_with_only_corrupt_checkpoints(abc_checkpoint, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(abc_checkpoint, out)
    weights = out / "ckpt-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated
    result = run("sample.py", "--device=cpu", f"--out_dir={out}")
    assert_user_error(result, "corrupt")
    assert "warning: skipping corrupt checkpoint" in result.stdout


def test_sample_with_a_valid_prompt_works(abc_checkpoint, tmp_path):
    """The control for the cases above: the same checkpoint samples fine from a prompt inside its vocabulary."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("cab")
    result = run(
        "sample.py",
        "--device=cpu",
        f"--out_dir={abc_checkpoint}",
        f"--start=FILE:{prompt}",
        "--num_samples=2",
        "--max_new_tokens=5",
    )
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")[:2]
    assert len(samples) == 2 and all(s.startswith("cab") and set(s.strip()) <= set("abc") for s in samples)
