"""EMA weights: the average follows ema = d * ema + (1 - d) * weight step by step, with the decay warmed up as
d = min(decay, (1 + t) / (10 + t)) after t updates; it is saved and restored with its update count so a resumed run
is bit-exact (an average saved before the count loads as warmed up), is the same on 2 DDP ranks as in one process,
is evaluated beside the raw weights, and is what sample.py, tools/evaluate.py and tools/export_hf.py load with
--weights=ema."""

import math
import os

import pytest
import torch
from conftest import rehash_checkpoint
from safetensors.torch import load_file
from test_distributed import CONFIG, rank_logs, records, torchrun
from test_train import args, step_losses

import sample
import train
from engine.checkpoint import find_checkpoint, list_checkpoints, load_model, load_state
from engine.ema import EMA, UPDATES
from engine.errors import UserError


def raw_and_average(path) -> tuple[dict, dict]:
    return load_file(os.path.join(path, "model.safetensors")), load_state(path)["ema"]


def scalar_model(value: float) -> torch.nn.Module:
    """One weight, set by hand between updates as an optimizer step would set it."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([value]))
    return model


def averaged_after(ema: EMA, model: torch.nn.Module, weights: list[float]) -> list[float]:
    """The average after each update, the weight set to each of `weights` in turn before it."""
    out = []
    for w in weights:
        model.w.data.fill_(w)
        ema.update(model)
        out.append(ema.state_dict()["w"].item())
    return out


def test_the_warmed_up_decay_by_hand():
    """From 0 towards a weight of 1: the decays are 1/10, 2/11, then 3/12 capped at decay=0.2, so the share of the
    start left is their product, and the average is 1 minus it."""
    model = scalar_model(0.0)
    ema = EMA(model, 0.2)
    got = averaged_after(ema, model, [1.0, 1.0, 1.0, 1.0])
    want = [1 - 0.1, 1 - 0.1 * 2 / 11, 1 - 0.1 * 2 / 11 * 0.2, 1 - 0.1 * 2 / 11 * 0.2 * 0.2]
    assert got == pytest.approx(want, rel=1e-6)
    assert ema.state_dict()[UPDATES].item() == 4
    plain = EMA(model := scalar_model(0.0), 0.2, warmup=False)  # the switch off: the full decay from the first update
    assert averaged_after(plain, model, [1.0, 1.0]) == pytest.approx([0.8, 1 - 0.2**2], rel=1e-6)


def test_with_warmup_the_init_is_gone_after_2000_steps_at_0_999():
    """The share of the initial weights left after n updates is the product of the decays. Without warmup it is
    0.999**2000 = 13.5%; warmed up, the first 8,990 decays are (1 + t) / (10 + t), whose product is 9! n! / (n + 9)!
    = 1 / C(n + 9, 9), about 1e-24 at n = 2000."""
    n = 2000
    for warmup, want in ((False, 0.999**n), (True, 1 / math.comb(n + 9, 9))):
        model = scalar_model(1.0)
        ema = EMA(model, 0.999, warmup=warmup)
        model.w.data.zero_()  # every later weight is 0: what the average holds is the init's share
        for _ in range(n):
            ema.update(model)
        assert ema.state_dict()["w"].item() == pytest.approx(want, rel=1e-3)
    assert 1 / math.comb(n + 9, 9) < 1e-20 and 0.999**n > 0.13


def test_a_saved_average_resumes_exactly(tmp_path):
    """Save after 5 updates (through torch.save and a weights_only load, as state.pt is), load into a fresh EMA, 7
    more updates: bit-equal to 12 updates in one go, the count included."""
    torch.manual_seed(0)
    init, *steps = [torch.randn(3, 4) for _ in range(13)]

    def run(updates: list[torch.Tensor], ema: EMA | None = None) -> EMA:
        model = torch.nn.Linear(4, 3, bias=False)
        model.weight.data.copy_(init)
        ema = ema or EMA(model, 0.95)
        for w in updates:
            model.weight.data.copy_(w)
            ema.update(model)
        return ema

    whole = run(steps).state_dict()
    torch.save(run(steps[:5]).state_dict(), tmp_path / "ema.pt")
    saved = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert saved[UPDATES].item() == 5
    resumed = EMA(torch.nn.Linear(4, 3, bias=False), 0.95)  # other weights, a count of 0: both replaced by the load
    resumed.load_state_dict(saved)
    resumed = run(steps[5:], resumed).state_dict()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_an_average_saved_before_the_count_loads_warmed_up():
    """An older checkpoint's average (parameter names only) was made with the full decay from the first update and
    after an unknown number of them: it goes on with the full decay, and is saved again without a count."""
    model = scalar_model(0.0)
    ema = EMA(model, 0.9)
    ema.load_state_dict({"w": torch.tensor([0.5])})
    assert averaged_after(ema, model, [1.0]) == pytest.approx([0.9 * 0.5 + 0.1], rel=1e-6)  # not 2/11's weight
    assert set(ema.state_dict()) == {"w"}


def test_the_average_follows_the_update_rule_step_by_step(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=3", "--eval_interval=1", "--ema_decay=0.5", "--keep_last=5"))
    ckpts = list_checkpoints(out)
    assert [os.path.basename(c) for c in ckpts] == ["ckpt-0000001", "ckpt-0000002", "ckpt-0000003"]
    (_, e2), (w3, e3) = raw_and_average(ckpts[1]), raw_and_average(ckpts[2])
    t = e2.pop(UPDATES).item()
    assert e3.pop(UPDATES).item() == t + 1
    d = min(0.5, (1 + t) / (10 + t))  # warmed up: below 0.5 for the first 8 updates
    assert d < 0.5
    for name, e in e3.items():
        torch.testing.assert_close(e, d * e2[name] + (1 - d) * w3[name], rtol=0, atol=2.5e-7)  # 2 ulp at 1
    assert any((e3[n] - w3[n]).abs().max() > 1e-4 for n in e3)  # the average is not the weights
    assert "(EMA weights: train loss" in capsys.readouterr().out


def test_resume_with_ema_is_bit_exact(char_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ema = ["--ema_decay=0.9", "--eval_interval=6"]
    train.main(args(char_data, a, "--max_iters=12", *ema))
    train.main(args(char_data, b, "--max_iters=6", *ema))
    train.main(args(char_data, b, "--max_iters=12", "--init_from=resume", *ema))
    la, lb = step_losses(a), step_losses(b)
    assert [la[i] for i in range(6, 12)] == [lb[i] for i in range(6, 12)]
    ea, eb = (load_state(find_checkpoint(d))["ema"] for d in (a, b))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_readers_load_the_average_with_weights_ema(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=4", "--eval_interval=4", "--ema_decay=0.8"))
    path = find_checkpoint(out)
    model, _ = load_model(path, weights="ema")
    average = load_state(path)["ema"]
    assert average.pop(UPDATES).item() == 4  # the update count rides along, and the readers skip it
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in average.items())
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--weights=ema", "--num_samples=1", "--max_new_tokens=5", "--device=cpu"])
    assert "EMA weights" in capsys.readouterr().err
    plain = str(tmp_path / "plain")
    train.main(args(char_data, plain, "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(UserError, match="trained without --ema_decay"):
        load_model(find_checkpoint(plain), weights="ema")
    with pytest.raises(UserError, match="trained without --ema_decay"):
        train.main(args(char_data, plain, "--max_iters=4", "--eval_interval=2", "--init_from=resume", "--ema_decay=.9"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_average_as_one_process(char_data, tmp_path, mode):
    """Under FSDP each rank averages its shards, and the checkpoint holds the whole average."""
    run = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    run += ["--ema_decay=0.7", "--eval_interval=3"]  # a resume in between: the average is restored into the shards
    single, ranks = str(tmp_path / "single"), str(tmp_path / mode)
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ranks}", "--max_iters=3", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    result = torchrun(tmp_path, *run, f"--out_dir={ranks}", "--init_from=resume", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = (load_state(find_checkpoint(d))["ema"] for d in (single, ranks))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    evals = [[r["val_loss_ema"] for r in records(d) if "val_loss_ema" in r] for d in (single, ranks)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)


def test_resuming_a_state_whose_average_is_another_models_is_one_line(char_data, tmp_path):
    """A state.pt from elsewhere (its checksums rewritten to match, as a tarball's would be) whose average has other
    shapes: one line, not a copy_ traceback."""
    out = str(tmp_path / "out")
    train.main(args(char_data, out, "--max_iters=2", "--eval_interval=2", "--ema_decay=0.9"))
    path = find_checkpoint(out)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    name = next(n for n in state["ema"] if n != UPDATES)
    state["ema"][name] = torch.zeros(3, 5)
    torch.save(state, os.path.join(path, "state.pt"))
    rehash_checkpoint(path)
    with pytest.raises(UserError, match="state.pt: ema"):
        train.main(args(char_data, out, "--init_from=resume", "--max_iters=4", "--ema_decay=0.9"))
