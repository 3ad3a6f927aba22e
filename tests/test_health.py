"""Per-layer health telemetry: gradient norms and update ratios by their definitions, activation RMS and MoE loads
from a probe that changes nothing (a run's losses are the same with it on), the clipped-step count, the log lines
and records, and plot.py --health's heatmaps."""

import json
import math
import os

import pytest
import torch
from test_distributed import CONFIG, rank_logs, records, torchrun
from test_plot import png_size
from test_switches import routing_by_hand
from test_train import args, step_losses

import train
from engine import health, loss_curve
from engine.attention import attention_weights, entropy
from model import GPT, GPTConfig
from tools import plot


def test_grad_norms_and_update_ratios_are_their_definitions():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(32, (2, 8))
    model(x, x)[1].backward()
    norms, before = health.before_step(model)
    for block, norm in zip(model.transformer.h, norms, strict=True):
        expected = torch.cat([p.grad.flatten() for p in block.parameters()]).norm().item()
        assert norm == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        for p in model.transformer.h[1].parameters():
            p.mul_(1.5)  # every weight of block 1 moves by half its size; block 0 stays
    assert health.update_ratios(model, before) == pytest.approx([0.0, 0.5], abs=1e-6)


def test_moe_loads_are_shares_of_the_tokens():
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, n_expert=4, n_expert_active=2))
    inputs = []  # each MoE layer's input, to route its tokens by hand
    hooks = [b.mlp.register_forward_pre_hook(lambda m, i: inputs.append(i[0].float())) for b in model.transformer.h]
    # under CPU autocast, as a bf16 run probes: the experts' rows are padded there, and the padding is no load
    probed = health.probe(model, torch.randint(32, (3, 8)), lambda: torch.autocast("cpu", torch.bfloat16))
    for h in hooks:
        h.remove()
    assert len(probed["act_rms"]) == 2 and all(r > 0 for r in probed["act_rms"])
    loads = probed["expert_load"]
    assert len(loads) == 2 and all(sum(layer) == pytest.approx(1.0) and len(layer) == 4 for layer in loads)
    for block, x, load in zip(model.transformer.h, inputs, loads, strict=True):  # the 24 tokens' 48 routing slots
        _, chosen, _ = routing_by_hand(block.mlp, x.reshape(24, 16), 2)
        assert load == pytest.approx((torch.bincount(chosen.flatten(), minlength=4) / 48).tolist())


def test_attention_entropy_is_the_mean_over_heads_and_positions_of_the_first_sequence():
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=3, n_head=2, n_embd=16)).eval()
    x = torch.randint(32, (3, 8))
    probed = health.probe(model, x, torch.no_grad)
    expected = [entropy(probs).mean().item() for probs in attention_weights(model, x[:1])]
    assert probed["attn_entropy"] == pytest.approx(expected, rel=1e-5)
    assert all(0 < h < math.log(8) for h in probed["attn_entropy"]) and "expert_load" not in probed
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.zero_()  # q = k = 0: every query spreads evenly over the keys it may see
            block.attn.c_attn.bias.zero_()
    uniform = sum(math.log(n) for n in range(1, 9)) / 8
    assert health.probe(model, x, torch.no_grad)["attn_entropy"] == pytest.approx([uniform] * 3, rel=1e-5)


def test_a_run_with_telemetry_logs_it_and_trains_the_same(char_data, tmp_path, capsys):
    plain, watched = str(tmp_path / "plain"), str(tmp_path / "watched")
    run = ["--max_iters=6", "--eval_interval=6", "--grad_clip=1e-6"]  # every step clipped
    train.main(args(char_data, plain, *run))
    capsys.readouterr()
    train.main(args(char_data, watched, *run, "--health_interval=2"))
    assert step_losses(plain) == step_losses(watched)  # the probe and the copies change nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("health ")]
    assert [line.split()[1] for line in lines] == ["0", "2", "4"] and "grad norm" in lines[0]
    with open(os.path.join(watched, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "act_rms" in r]
    assert [r["clipped_steps"] for r in rows] == [1, 3, 5]  # every step so far, this one included
    assert all(len(r[q]) == 2 for r in rows for q in health.QUANTITIES)
    out = str(tmp_path / "health.png")
    plot.main([watched, "--health=True", f"--out={out}"])
    assert png_size(out) == (loss_curve.FIGSIZE[0] * loss_curve.DPI, loss_curve.FIGSIZE[1] * loss_curve.DPI)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_report_the_health_of_one_process(char_data, tmp_path, mode):
    """The gradient norms and update ratios of the whole (all-reduced, or under FSDP summed over the shards) model,
    and the probe on the master's batch: the numbers one process reports for the same global batch."""
    run = [f"--data_root={char_data}", "--dataset=tiny_char", "--gradient_accumulation_steps=2", *CONFIG]
    run.append("--health_interval=2")
    single, ranks = str(tmp_path / "single"), str(tmp_path / mode)
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ranks}", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = ([r for r in records(d) if "act_rms" in r] for d in (single, ranks))
    assert [r["iter"] for r in ours] == [r["iter"] for r in theirs] == [0, 2, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a["clipped_steps"] == b["clipped_steps"]
        for name in health.QUANTITIES:
            assert b[name] == pytest.approx(a[name], rel=1e-4), (a["iter"], name)


def test_resume_with_telemetry_on_is_exact(char_data, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run = ["--eval_interval=3", "--health_interval=2", "--grad_clip=0.5"]
    train.main(args(char_data, whole, "--max_iters=6", *run))
    train.main(args(char_data, parts, "--max_iters=3", *run))
    train.main(args(char_data, parts, "--max_iters=6", "--init_from=resume", *run))
    assert step_losses(whole) == step_losses(parts)
    rows = [{r["iter"]: r for r in records(d) if "act_rms" in r} for d in (whole, parts)]
    assert list(rows[0]) == list(rows[1]) == [0, 2, 4] and rows[0] == rows[1]  # the clipped-step count is restored
