"""Class 8 of "Nothing lost, by construction": memory bounds on every entry point.

A request that cannot fit in the device's memory (a training config, a checkpoint's or Hugging Face config's sizes, a
nanoGPT checkpoint's model_args, sampling num_samples sequences at once, scoring batch_size windows at once) is refused
in one line before anything is allocated, instead of an allocator error minutes later or a machine brought down."""

import dataclasses
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_bad_inputs import assert_user_error, run
from test_from_nanogpt import nano_char  # noqa: F401 (a fixture)
from test_train import args
from test_writes_stay_inside import snapshot

import sample
import train
from engine.checkpoint import save_checkpoint
from engine.errors import UserError
from engine.memory import device_memory, estimate_params
from model import GPT, GPTConfig

RAM = device_memory("cpu")
FUZZ = settings(derandomize=True, deadline=None, max_examples=25, suppress_health_check=list(HealthCheck))


def sizes():
    """Model shapes from tiny to absurd (up to a 10^6-wide, 10^4-layer model over a 10^7 vocabulary)."""
    return st.fixed_dictionaries(
        {
            "n_layer": st.integers(1, 10_000),
            "n_head": st.sampled_from([1, 2, 4, 8]),
            "n_embd": st.integers(1, 1 << 20).map(lambda n: max(8, n // 8 * 8)),
            "vocab_size": st.integers(65, 10_000_000),
        }
    )


def too_big(config: GPTConfig, batch_tokens: int = 0) -> bool:
    return estimate_params(config) * 4 + batch_tokens * config.n_embd * 34 * config.n_layer > RAM


@FUZZ
@given(shape=sizes(), batch_size=st.integers(1, 4096))
def test_a_training_config_that_cannot_fit_is_refused_before_allocating(char_data, tmp_path_factory, shape, batch_size):
    config = GPTConfig(block_size=64, **shape)
    assume(too_big(config, batch_size * 64))
    out = str(tmp_path_factory.mktemp("out"))
    flags = [f"--{k}={v}" for k, v in shape.items() if k != "vocab_size"]
    with pytest.raises(UserError, match="needs at least .* GiB"):
        train.main(args(char_data, out, *flags, f"--vocab_size={shape['vocab_size']}", f"--batch_size={batch_size}"))
    assert os.listdir(out) == []


def abc_run(out, **config) -> str:
    """out_dir holding one checkpoint over the character vocabulary "abc", of a model with these sizes (written as
    meta.json says, whatever the weights hold: the sizes are what a reader checks first)."""
    model = GPT(GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=8))
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    sizes = dataclasses.asdict(GPTConfig(block_size=8, **config))  # (mlp_hidden and the like follow the sizes)
    meta = {"model_config": sizes, "train_config": {}, "data": data}
    save_checkpoint(str(out), 1, model, {"optimizers": [], "scaler": {}, "iter_num": 1, "best_val_loss": 1.0}, meta)
    return str(out)


@FUZZ
@given(shape=sizes())
def test_a_checkpoint_whose_sizes_cannot_fit_is_refused_before_allocating(tmp_path_factory, shape):
    assume(too_big(GPTConfig(block_size=8, **shape)))
    out = abc_run(tmp_path_factory.mktemp("abc"), **shape)
    with pytest.raises(UserError, match="needs at least"):
        sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=2"])


@FUZZ
@given(num_samples=st.integers(10**6, 10**12), block_size=st.sampled_from([8, 1024, 65536]))
def test_sampling_more_sequences_than_fit_is_refused_before_the_batch_is_built(
    tmp_path_factory, num_samples, block_size
):
    """A KV cache of num_samples x block_size positions; block_size large enough that a few million sequences do not
    fit (the model's own weights are tiny)."""
    config = GPTConfig(block_size=block_size, vocab_size=3, n_layer=2, n_head=2, n_embd=64)
    assume(2 * 2 * num_samples * 64 * block_size * 4 > RAM)
    out = tmp_path_factory.mktemp("abc")
    model = GPT(config)
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    meta = {"model_config": dataclasses.asdict(config), "train_config": {}, "data": data}
    save_checkpoint(str(out), 1, model, {"optimizers": [], "scaler": {}, "iter_num": 1, "best_val_loss": 1.0}, meta)
    with pytest.raises(UserError, match="lower --num_samples"):
        sample.main([f"--out_dir={out}", "--device=cpu", f"--num_samples={num_samples}", "--start=ab"])


def test_scoring_more_windows_at_once_than_fit_is_refused_in_one_line(tmp_path):
    """tools/evaluate.py --stride=1 --batch_size=<huge> over a long text: every window in one batch."""
    config = GPTConfig(block_size=4096, vocab_size=65536, n_layer=1, n_head=1, n_embd=8)
    model = GPT(config)
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    meta = {"model_config": dataclasses.asdict(config), "train_config": {}, "data": data}
    out = tmp_path / "out"
    save_checkpoint(str(out), 1, model, {"optimizers": [], "scaler": {}, "iter_num": 1, "best_val_loss": 1.0}, meta)
    text = tmp_path / "long.txt"
    text.write_text("abc" * 20_000)
    before = snapshot(tmp_path)
    result = run(
        "tools/evaluate.py", f"--out_dir={out}", f"--text={text}", "--stride=1", "--batch_size=1000000", "--device=cpu"
    )
    assert_user_error(result, "lower --batch_size")
    assert snapshot(tmp_path) == before


def test_a_hugging_face_config_that_cannot_fit_is_refused_in_one_line(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "gpt2", "n_layer": 2000, "n_head": 16, "n_embd": 65536, "n_positions": 1024}
    (hf / "config.json").write_text(json.dumps(config | {"vocab_size": 50257, "architectures": ["GPT2LMHeadModel"]}))
    before = snapshot(tmp_path)
    assert_user_error(run("sample.py", f"--init_from={hf}", "--device=cpu", "--start=a"), "needs at least")
    assert snapshot(tmp_path) == before


def test_a_nanogpt_checkpoint_whose_model_args_cannot_fit_is_refused_in_one_line(nano_char, tmp_path):  # noqa: F811
    """prepare/from_nanogpt.py checks model_args like a training config, before building the model or writing the
    dataset's meta.json."""
    model_args = {"n_layer": 4000, "n_head": 16, "n_embd": 65536, "block_size": 1024, "bias": True, "vocab_size": 65}
    ckpt = {
        "model": {"transformer.wte.weight": torch.zeros(1)},
        "model_args": model_args,
        "config": {"dataset": "nano_char"},
        "iter_num": 1,
    }
    torch.save(ckpt, tmp_path / "ckpt.pt")
    before = snapshot(tmp_path)
    result = run(
        "prepare/from_nanogpt.py",
        str(tmp_path / "ckpt.pt"),
        f"--out_dir={tmp_path / 'ours'}",
        f"--data_dir={nano_char}",
    )
    assert_user_error(result, "needs at least")
    assert snapshot(tmp_path) == before
