"""TrainState is the one owner of a run's state: what a checkpoint holds is what a rollback restores, for every
stateful feature alone and together (LoRA, EMA, Muon, the float16 loss scaler, an optimizer that has not stepped).
The end-to-end pins (bit-exact resume with these features, rollback runs, DDP and FSDP equal to one process) are in
test_features_meet.py, test_rollback.py and test_distributed.py; these check the object itself, step by step."""

import copy
from types import SimpleNamespace

import pytest
import torch

from engine.checkpoint import read_meta
from engine.ema import EMA
from engine.optim import setup_training
from engine.rollback import CARRY_ON, ROLL_BACK, STOP, BadSteps
from engine.train_state import TrainState, start_lora
from model import GPT, GPTConfig

CASES = {  # (lora, ema, optimizer, float16 loss scaling)
    "plain": (False, False, "adamw", False),
    "lora": (True, False, "adamw", False),
    "ema": (False, True, "adamw", False),
    "muon": (False, False, "muon", False),
    "float16 scaler": (False, False, "adamw", True),
    "lora+ema+scaler": (True, True, "adamw", True),
    "muon+ema": (False, True, "muon", False),
}


def runtime() -> SimpleNamespace:
    return SimpleNamespace(master=True, rank=0, world_size=1, device="cpu", ddp=False, print0=lambda *a: None)


def build(case: str, out_dir: str) -> TrainState:
    lora, ema, optimizer, float16 = CASES[case]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False))
    record = start_lora(model, 2, 16.0, "attn,mlp", None, "scratch", out_dir, runtime()) if lora else None
    optimizers = setup_training(model, optimizer, 0.1, 1e-2, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=float16, init_scale=2.0**8)
    average = EMA(model, 0.9) if ema else None
    meta = {"train_config": {"dataset": "none"}, "data": {"tokenizer": "none"}}
    return TrainState(model, optimizers, scaler, average, record, runtime(), False, out_dir, 5, meta)


def train(state: TrainState, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16), generator=generator)
        _, loss = state.model(x, x)
        state.scaler.scale(loss).backward()
        state.clip_gradients(1.0)
        state.step(take=True)
        state.loop.iter_num += 1
        state.loop.recent_losses.append(loss.item())


def assert_same(a, b, where="state") -> None:
    """Equal to the bit: tensors by torch.equal, containers entry by entry."""
    assert type(a) is type(b) or isinstance(a, dict) and isinstance(b, dict), where  # (an OrderedDict is a dict)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", CASES)
def test_a_snapshot_restores_the_whole_state_and_stays_as_it_was(case, tmp_path):
    state = build(case, str(tmp_path))
    train(state, 2, seed=1)
    snapshot = state.snapshot()
    before = copy.deepcopy(state.state_dict())
    train(state, 3, seed=2)
    state.restore(snapshot)
    assert_same(state.state_dict(), before)
    train(state, 3, seed=2)
    after_once = copy.deepcopy(state.state_dict())
    state.restore(snapshot)  # training on did not change the snapshot through a shared tensor
    assert_same(state.state_dict(), before)
    train(state, 3, seed=2)
    assert_same(state.state_dict(), after_once)


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_holds_what_a_rollback_restores(case, tmp_path):
    state = build(case, str(tmp_path))
    train(state, 3, seed=1)
    path = state.save({"train": 1.0, "val": 2.0})
    saved = copy.deepcopy(state.state_dict())
    assert read_meta(path)["val_loss"] == 2.0 and (read_meta(path).get("lora") is not None) == CASES[case][0]
    train(state, 2, seed=2)
    state.roll_back_to(path)
    assert_same(state.state_dict(), saved)
    fresh = build(case, str(tmp_path / "other"))  # a new process resuming it: the same state again
    fresh.model.load_state_dict(state.model.state_dict())
    fresh.resume(path)
    assert_same(fresh.state_dict(), saved)


def test_an_optimizer_that_has_not_stepped_is_fresh_again_after_a_restore(tmp_path):
    state = build("plain", str(tmp_path))
    snapshot = state.snapshot()
    train(state, 2, seed=1)
    state.restore(snapshot)
    assert all(not opt.state for opt in state.optimizers)
    assert state.loop.iter_num == 0 and state.loop.recent_losses == []


def test_bad_steps_give_one_verdict_per_step_and_roll_back_to_the_start(tmp_path):
    state = build("ema", str(tmp_path))
    bad = BadSteps(state, None, 2, 1, 4.0, 10, 2, 0.5, False, 1.0, 1e-2)  # 2 non-finite stop; 1 rollback, patience 2
    train(state, 1, seed=1)
    start = copy.deepcopy(bad.start)
    assert bad.judge(state, 1.0, True, False) == CARRY_ON
    assert bad.judge(state, 100.0, True, False) == CARRY_ON  # one spike step: patience 2
    assert bad.judge(state, 100.0, True, False) == ROLL_BACK
    records = []
    bad.roll_back(state, 100.0, records.append)
    assert records[0]["rollback"] == 1 and records[0]["to"] == "the start of this run"
    assert state.loop.rollbacks == 1 and state.loop.lr_scale == 0.5 and state.loop.iter_num == 0
    restored = state.state_dict()
    for key in ("model", "optimizers", "ema"):
        assert_same(restored[key], start[key], key)
    assert bad.judge(state, float("nan"), False, False) == CARRY_ON  # non-finite: skipped, counted
    assert bad.judge(state, float("nan"), False, False) == STOP  # a spike after max_rollbacks rollbacks
    assert state.loop.skipped_steps == 2 and "a loss spike after 1 rollbacks" in bad.stop_line


def test_a_loss_near_zero_that_doubles_is_noise_not_a_spike(tmp_path):
    """A run that has all but solved its task (the reverse recipe, at loss 0.002) sees batches at 5x the median that
    are noise in absolute terms: they must not roll it back, while a real jump still does."""
    state = build("plain", str(tmp_path))
    bad = BadSteps(state, None, 2, 3, 4.0, 10, 2, 0.5, False, 1.0, 1e-2)
    for loss in (0.002, 0.003, 0.002, 0.0025):
        assert bad.judge(state, loss, True, False) == CARRY_ON
    for _ in range(3):
        assert bad.judge(state, 0.0132, True, False) == CARRY_ON  # 5x the median, but 0.011 nats above it
    assert bad.judge(state, 1.5, True, False) == CARRY_ON and bad.judge(state, 1.5, True, False) == ROLL_BACK
