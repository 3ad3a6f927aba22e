"""prepare/from_nanogpt.py: a nanoGPT user's datasets and checkpoints, in nanoGPT's own file formats.

The fixtures write those formats the way nanoGPT's scripts do (data/shakespeare_char/prepare.py: meta.pkl with
vocab_size, itos and stoi, and flat uint16 train.bin/val.bin; train.py: ckpt.pt with model, optimizer, model_args,
iter_num, best_val_loss and config, the model's keys prefixed `_orig_mod.` when it was compiled). nanoGPT's GPT is
learned positions, LayerNorm, exact GELU and tied embeddings: our GPT with mlp="gelu" is the same function, so a
model of ours stands in for one nanoGPT trained."""

import dataclasses
import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import shakespeare_text
from from_nanogpt import main as import_main
from from_nanogpt import nanogpt_train_config, resume_flags, train_defaults

import sample
import train
from engine.checkpoint import find_checkpoint, load_model, load_state
from engine.data import load_data
from engine.errors import UserError
from model import GPT, GPTConfig

ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": False, "dropout": 0.0}


@pytest.fixture
def nano_char(tmp_path):
    """A character dataset as nanoGPT's data/shakespeare_char/prepare.py writes it."""
    text = shakespeare_text(50_000)
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    d = tmp_path / "data" / "nano_char"
    d.mkdir(parents=True)
    ids[: int(len(ids) * 0.9)].tofile(d / "train.bin")
    ids[int(len(ids) * 0.9) :].tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return d


def nano_checkpoint(path, vocab_size, dataset, compiled=True):
    """A ckpt.pt as nanoGPT's train.py saves it, from a briefly trained model; returns that model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS, vocab_size=vocab_size, mlp="gelu"))
    params = dict(model.named_parameters())  # nanoGPT's configure_optimizers: decayed matrices, then the rest
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        x = torch.randint(vocab_size, (4, ARGS["block_size"]))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    if compiled:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))  # the mask buffer of old torch
    config = {"dataset": dataset, "batch_size": 4, "learning_rate": 1e-3, "max_iters": 5000, "beta2": 0.99}
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "model_args": ARGS | {"vocab_size": vocab_size},
            "iter_num": 250,
            "best_val_loss": torch.tensor(2.5).item(),
            "config": config,
        },
        path,
    )
    return model.eval(), optimizer


def test_a_nanogpt_char_dataset_trains_once_described(nano_char, tmp_path, capsys):
    with pytest.raises(UserError, match="python prepare/from_nanogpt.py"):  # the refusal names the real command
        load_data(str(nano_char), block_size=32)
    before = {f: (nano_char / f).read_bytes() for f in ("train.bin", "val.bin")}
    import_main([str(nano_char)])
    assert {f: (nano_char / f).read_bytes() for f in before} == before  # the token files are used as they are
    data = load_data(str(nano_char), block_size=32)
    assert data.meta["tokenizer"] == "char" and data.meta["vocab_size"] == len(set(shakespeare_text(50_000)))
    out = tmp_path / "out"
    argv = [f"--data_root={nano_char.parent}", "--dataset=nano_char", f"--out_dir={out}", "--device=cpu"]
    argv += ["--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4"]
    assert train.main([*argv, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]) == 0
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--device=cpu", "--start=ROMEO:", "--max_new_tokens=5", "--num_samples=1"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_a_meta_pkl_that_would_run_code_is_refused(nano_char, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (nano_char / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Payload()}))
    with pytest.raises(UserError, match="meta.pkl is refused: it names posix.mkdir"):
        import_main([str(nano_char)])
    assert not marker.exists() and not (nano_char / "meta.json").exists()


def test_bare_token_files_are_gpt2_and_every_id_is_checked(tmp_path):
    d = tmp_path / "owt"
    d.mkdir()
    ids = np.array([464, 3290, 50256, 314, 50256], dtype=np.uint16)
    ids.tofile(d / "train.bin")
    ids.tofile(d / "val.bin")
    import_main([f"--data_dir={d}"])
    meta = load_data(str(d), block_size=2).meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert meta["splits"]["train"]["documents"] == 2  # one end-of-text token per document
    bad = tmp_path / "bad"
    bad.mkdir()
    np.array([1, 2, 60000], dtype=np.uint16).tofile(bad / "train.bin")
    ids.tofile(bad / "val.bin")
    with pytest.raises(UserError, match="token id 60000 at 2, outside the vocabulary of 50257"):
        import_main([str(bad)])
    assert not (bad / "meta.json").exists()


def test_a_nanogpt_checkpoint_samples_the_same_and_resumes_with_its_optimizer(nano_char, tmp_path, capsys):
    import_main([str(nano_char)])
    vocab = load_data(str(nano_char), block_size=32).meta["vocab_size"]
    ckpt = tmp_path / "ckpt.pt"
    theirs, their_optimizer = nano_checkpoint(ckpt, vocab, "nano_char")
    out = tmp_path / "out-nano"
    import_main([str(ckpt), f"--out_dir={out}", f"--data_dir={nano_char}"])
    printed = capsys.readouterr().out
    path = find_checkpoint(str(out))
    ours, meta = load_model(path)
    assert meta["iter_num"] == 250 and meta["val_loss"] == 2.5 and meta["model_config"]["mlp"] == "gelu"
    x = torch.randint(vocab, (2, 32))
    torch.testing.assert_close(ours.eval()(x, all_logits=True)[0], theirs(x, all_logits=True)[0], rtol=0, atol=0)

    # greedy text equals what the original model produces (nanoGPT's sample.py --top_k=1 is greedy)
    sample.main([f"--out_dir={out}", "--device=cpu", "--start=ROMEO:", "--max_new_tokens=20", "--temperature=0"])
    text = capsys.readouterr().out.splitlines()[-2]
    chars = load_data(str(nano_char), block_size=32).meta["chars"]
    idx = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    for _ in range(20):
        idx = torch.cat([idx, theirs(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text.startswith("".join(chars[i] for i in idx[0].tolist()))

    # the AdamW moments came along, keyed by parameter name
    moments = load_state(path)["optimizers"][0]["state"]
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(moments[name]["exp_avg"], their_optimizer.state[p]["exp_avg"])
    resume = printed.split("continue it: python train.py ")[1].split()
    assert train.main([*resume, "--device=cpu", "--compile=False", "--max_iters=252", "--eval_interval=2"]) == 0
    assert load_model(find_checkpoint(str(out)))[1]["iter_num"] == 252


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"model": Payload(), "model_args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="cannot load .* safely"):
        import_main([str(tmp_path / "ckpt.pt"), f"--out_dir={tmp_path / 'out'}"])
    assert not marker.exists()


def test_a_nanogpt_run_directory_stands_for_its_ckpt_pt(nano_char, tmp_path):
    """nanoGPT users name a checkpoint by its run directory (train.py --out_dir=out-shakespeare-char writes
    out-shakespeare-char/ckpt.pt): the directory converts as the file does, positional or as --ckpt, and one that
    holds no ckpt.pt is refused in one line that names it."""
    import_main([str(nano_char)])
    vocab = load_data(str(nano_char), block_size=32).meta["vocab_size"]
    run = tmp_path / "out-shakespeare-char"
    run.mkdir()
    theirs, _ = nano_checkpoint(run / "ckpt.pt", vocab, "nano_char")
    x = torch.randint(vocab, (2, 32))
    for i, given in enumerate([[str(run)], [f"--ckpt={run}"]]):
        out = tmp_path / f"out-nano-{i}"
        import_main([*given, f"--out_dir={out}", f"--data_dir={nano_char}"])
        ours, meta = load_model(find_checkpoint(str(out)))
        assert meta["iter_num"] == 250 and meta["imported_from"] == str(run / "ckpt.pt")
        torch.testing.assert_close(ours.eval()(x, all_logits=True)[0], theirs(x, all_logits=True)[0], rtol=0, atol=0)
    empty = tmp_path / "out-empty"
    empty.mkdir()
    for given in ([str(empty)], [f"--ckpt={empty}"]):
        with pytest.raises(UserError, match=f"^{re.escape(str(empty))} holds no ckpt.pt") as refused:
            import_main([*given, f"--out_dir={tmp_path / 'out-never'}", f"--data_dir={nano_char}"])
        assert "\n" not in str(refused.value)
    assert not (tmp_path / "out-never").exists()
    # a dataset directory and a checkpoint, in either order, with or without --ckpt=
    for i, given in enumerate([[str(nano_char), f"--ckpt={run}"], [str(run / "ckpt.pt"), str(nano_char)]]):
        import_main([*given, f"--out_dir={tmp_path / f'out-both-{i}'}"])
        assert load_model(find_checkpoint(str(tmp_path / f"out-both-{i}")))[1]["iter_num"] == 250


def test_a_nanogpt_config_becomes_train_pys_options_checked_by_train_py():
    """nanoGPT's config keys that are train.py options are resolved by train.py (its defaults for the rest, its
    coercion and validation); a value of the wrong type or out of range is one line naming the checkpoint."""
    defaults = train_defaults()
    assert defaults == dataclasses.asdict(train.TrainConfig())
    nano = {"batch_size": 4, "learning_rate": 1e-3, "max_iters": 5000.0, "beta2": 0.99, "lr_decay_iters": None}
    config = nanogpt_train_config(nano | {"nanogpt_only": [1, 2]}, "ckpt.pt", defaults)
    expected = train.TrainConfig(batch_size=4, learning_rate=1e-3, max_iters=5000, beta2=0.99, lr_decay_iters=None)
    assert config == dataclasses.asdict(expected) and type(config["max_iters"]) is int
    for bad, message in [
        ({"batch_size": "four"}, "config.batch_size: 'four' is not a valid int"),
        ({"batch_size": [4]}, "config.batch_size: [4] is not a int"),
        ({"device": 5}, "config.device: 5 is not a str"),
        ({"learning_rate": float("inf")}, "config.learning_rate: inf is not a finite number"),
        ({"batch_size": 0}, "config: batch_size must be >= 1"),
    ]:
        with pytest.raises(UserError, match=f"^ckpt.pt: {re.escape(message)}") as refused:
            nanogpt_train_config(nano | bad, "ckpt.pt", defaults)
        assert "\n" not in str(refused.value)
    saved = defaults | {"n_layer": 2, "dataset": "nano_char"}
    assert resume_flags(saved, defaults) == "--n_layer=2 --dataset=nano_char"
