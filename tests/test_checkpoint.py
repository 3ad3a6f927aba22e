"""Checkpoints: exact round trip, clean key names (no compile/DDP prefixes), data-only files, hashes that catch
corruption, crash leftovers ignored, pruning."""

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from conftest import rehash_checkpoint
from safetensors import safe_open

import train
from engine.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
)
from engine.data import load_data
from engine.errors import UserError
from engine.runtime import setup_runtime
from model import GPT, GPTConfig

TINY = [
    "--device=cpu",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=16",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--eval_iters=2",
    "--log_interval=1",
    "--dropout=0.1",
    "--warmup_iters=2",
    "--lr_decay_iters=10",
]
DATA_FINGERPRINT = {"tokenizer": "char", "vocab_size": 65, "dtype": "uint16", "eot_id": None, "chars": "x" * 65}


def save(out_dir, iter_num: int, model, val_loss: float = 1.0) -> str:
    """save_checkpoint with a plausible state and meta, as train.py writes them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"optimizer": optimizer.state_dict(), "scaler": {}, "iter_num": iter_num, "best_val_loss": val_loss}
    meta = {
        "model_config": dataclasses.asdict(model.config),
        "train_config": {"max_iters": 100},
        "data": DATA_FINGERPRINT,
        "val_loss": val_loss,
    }
    return save_checkpoint(str(out_dir), iter_num, model, state, meta)


def flip_bytes(path: str, at: int = 1000, n: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def safetensors_keys(path: str) -> list[str]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_round_trip_gives_identical_logits(tmp_path, tiny_config):
    model = GPT(tiny_config)
    with torch.no_grad():  # move away from the init so a fresh model cannot match by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save(tmp_path, 7, model)

    assert find_checkpoint(str(tmp_path)) == path
    torch.manual_seed(123)  # a fresh model with different random weights
    fresh = GPT(GPTConfig(**read_meta(path)["model_config"]))
    idx = torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size))
    model.eval(), fresh.eval()
    assert not torch.equal(fresh(idx, all_logits=True)[0], model(idx, all_logits=True)[0])
    load_weights(path, fresh)
    assert torch.equal(fresh(idx, all_logits=True)[0], model(idx, all_logits=True)[0])
    # the tied lm_head/wte weight is still one tensor after loading (Press & Wolf 2017 tying survives)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_checkpoint_files_are_plain_data_and_hashed(tmp_path, tiny_config):
    path = save(tmp_path, 3, GPT(tiny_config), val_loss=2.5)
    assert os.path.basename(path) == "ckpt-0000003"
    assert sorted(os.listdir(path)) == ["COMPLETE", "meta.json", "model.safetensors", "state.pt"]

    keys = safetensors_keys(path)
    assert "transformer.h.0.attn.c_attn.weight" in keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)

    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)  # data only, no pickled code
    assert state["iter_num"] == 3 and state["best_val_loss"] == 2.5

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)  # plain JSON, no pickle
    assert meta["iter_num"] == 3 and meta["val_loss"] == 2.5 and meta["data"] == DATA_FINGERPRINT

    with open(os.path.join(path, "COMPLETE")) as f:
        hashes = json.load(f)
    for name in ("model.safetensors", "state.pt", "meta.json"):
        with open(os.path.join(path, name), "rb") as f:
            assert hashes[name] == hashlib.sha256(f.read()).hexdigest()


def test_trained_checkpoint_reproduces_its_recorded_val_loss(char_data, tmp_path):
    """Train a few iterations, then rebuild the model from the checkpoint alone: its val loss, evaluated on the
    same batches, equals the one the live model recorded in meta.json, bit for bit."""
    out = str(tmp_path / "out")
    argv = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", "--compile=False", *TINY]
    train.main([*argv, "--max_iters=4", "--eval_interval=4", "--dtype=float32"])  # as evaluated below

    path = find_checkpoint(out)
    assert os.path.basename(path) == "ckpt-0000004"
    meta = read_meta(path)
    assert {"model_config", "train_config", "data", "iter_num", "val_loss"} <= meta.keys()
    assert meta["iter_num"] == 4 and meta["train_config"]["max_iters"] == 4
    with open(os.path.join(char_data, "tiny_char", "meta.json")) as f:
        data_meta = json.load(f)
    assert {k: meta["data"][k] for k in ("tokenizer", "vocab_size", "chars")} == {
        k: data_meta[k] for k in ("tokenizer", "vocab_size", "chars")
    }
    assert meta["model_config"]["vocab_size"] == -(-data_meta["vocab_size"] // 64) * 64  # rounded up for speed
    assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["dropout"] == 0.1
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in safetensors_keys(path))
    state = load_state(path)
    assert state["iter_num"] == 4 and [set(s) for s in state["optimizers"]] == [{"state", "param_groups"}]

    model = GPT(GPTConfig(**meta["model_config"]))
    load_weights(path, model)
    cfg = train.TrainConfig(data_root=char_data, dataset="tiny_char", block_size=16, batch_size=4, eval_iters=2)
    rt = setup_runtime("cpu", "float32")
    data = load_data(os.path.join(char_data, "tiny_char"), 16)
    losses = train.estimate_loss(model, data, cfg, rt)
    assert losses["val"] == meta["val_loss"] and losses["train"] == meta["train_loss"]


@pytest.mark.slow
def test_compiled_training_saves_unprefixed_keys(char_data, tmp_path):
    out = str(tmp_path / "out")
    argv = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", "--compile=True", *TINY]
    train.main([*argv, "--max_iters=2", "--eval_interval=2", "--dropout=0.0"])
    path = find_checkpoint(out)
    keys = safetensors_keys(path)
    assert keys and not any("_orig_mod." in k or "module." in k for k in keys)
    load_weights(path, GPT(GPTConfig(**read_meta(path)["model_config"])))  # strict: every key matches


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_config, damage):
    model = GPT(tiny_config)
    older = save(tmp_path, 10, model)
    newest = save(tmp_path, 20, model)
    weights = os.path.join(newest, "model.safetensors")
    if damage == "flip":
        flip_bytes(weights)
    else:
        os.truncate(weights, os.path.getsize(weights) // 2)

    logged = []
    assert find_checkpoint(str(tmp_path), log=logged.append) == older
    assert len(logged) == 1 and "warning" in logged[0] and newest in logged[0] and "model.safetensors" in logged[0]


def test_every_checkpoint_corrupt_is_a_user_error(tmp_path, tiny_config):
    path = save(tmp_path, 10, GPT(tiny_config))
    flip_bytes(os.path.join(path, "state.pt"), at=10)
    with pytest.raises(UserError, match="corrupt"):
        find_checkpoint(str(tmp_path), log=lambda _: None)


def test_no_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        find_checkpoint(str(tmp_path / "empty"))


def test_leftover_temporary_directory_is_ignored(tmp_path, tiny_config):
    """A crash mid-save leaves .tmp-ckpt-*; it is neither listed nor loaded, even when it looks complete."""
    good = save(tmp_path, 10, GPT(tiny_config))
    leftover = tmp_path / ".tmp-ckpt-0000020-4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    (leftover / "COMPLETE").write_text("{}")
    unfinished = tmp_path / "ckpt-0000030"  # renamed but without COMPLETE: never a checkpoint
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"partial")

    assert list_checkpoints(str(tmp_path)) == [good]
    assert find_checkpoint(str(tmp_path), log=pytest.fail) == good


@pytest.mark.parametrize("iter_num", [20, 10], ids=["next_iteration", "same_iteration"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, tiny_config, monkeypatch, iter_num):
    """The module's promise: a crash at any moment of a save leaves earlier checkpoints intact. Simulate one at the
    rename of the finished temporary directory into ckpt-*, for a new iteration and for re-saving the same
    iteration (which a resumed run does at its first evaluation, with always_save_checkpoint)."""
    model = GPT(tiny_config)
    good = save(tmp_path, 10, model)
    real_replace = os.replace

    def crash(src, dst):
        if os.path.basename(dst).startswith("ckpt-"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    if iter_num == 10:  # the same iteration: the verified copy is kept and nothing is renamed
        assert save(tmp_path, iter_num, model) == good
    else:
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path, iter_num, model)
    monkeypatch.undo()
    assert find_checkpoint(str(tmp_path), log=pytest.fail) == good


class _Payload:
    """Unpickling this would call os.mkdir: the kind of code a pickle can smuggle into a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_state_holding_code_is_refused_not_run(tmp_path, tiny_config):
    """state.pt is loaded with weights_only=True: a pickle that would run code is refused, even with valid hashes."""
    marker = tmp_path / "code-ran"
    path = save(tmp_path / "out", 5, GPT(tiny_config))
    torch.save({"iter_num": 5, "payload": _Payload(str(marker))}, os.path.join(path, "state.pt"))
    rehash_checkpoint(path)

    assert find_checkpoint(str(tmp_path / "out"), log=pytest.fail) == path
    with pytest.raises(UserError, match="state.pt"):
        load_state(path)
    assert not marker.exists()


def test_prune_keeps_the_newest_and_the_best(tmp_path, tiny_config):
    model = GPT(tiny_config)
    val_losses = {10: 3.0, 20: 1.0, 30: 2.5, 40: 2.0, 50: 1.5}  # best is iter 20
    paths = {it: save(tmp_path, it, model, val_loss=v) for it, v in val_losses.items()}

    prune_checkpoints(str(tmp_path), keep_last=2)
    assert list_checkpoints(str(tmp_path)) == [paths[20], paths[40], paths[50]]
    assert find_checkpoint(str(tmp_path), which="best") == paths[20]

    prune_checkpoints(str(tmp_path), keep_last=0)  # the newest is never pruned: it may be a preemption checkpoint
    assert list_checkpoints(str(tmp_path)) == [paths[20], paths[50]]


def test_best_skips_a_corrupt_best(tmp_path, tiny_config):
    model = GPT(tiny_config)
    best = save(tmp_path, 10, model, val_loss=1.0)
    second = save(tmp_path, 20, model, val_loss=2.0)
    save(tmp_path, 30, model, val_loss=3.0)
    flip_bytes(os.path.join(best, "model.safetensors"))
    assert find_checkpoint(str(tmp_path), which="best", log=lambda _: None) == second


@pytest.mark.parametrize(
    "stored_as", [["transformer.wte.weight"], ["lm_head.weight"], ["transformer.wte.weight", "lm_head.weight"]]
)
def test_a_tied_weight_loads_under_any_of_its_names(tmp_path, tiny_config, stored_as):
    """Single-process saves store the tied embedding once, FSDP's gathered state dicts store both names, and
    older saves kept lm_head.weight: all load, and the tie holds afterwards."""
    from safetensors.torch import save_file

    from engine.checkpoint import load_weights

    model = GPT(tiny_config)
    path = save(tmp_path, 10, model)
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if k not in ("transformer.wte.weight", "lm_head.weight")
    }
    for name in stored_as:
        weights[name] = model.lm_head.weight.detach().clone()
    save_file(weights, os.path.join(path, "model.safetensors"))
    fresh = GPT(tiny_config)
    load_weights(path, fresh)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
