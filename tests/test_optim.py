"""AdamW parameter groups and the learning-rate schedule (linear warmup, cosine decay; Loshchilov & Hutter 2017)."""

import math

import pytest
import torch

from engine.optim import build_optimizer, lr_at
from model import GPT, GPTConfig

SCHEDULE = dict(learning_rate=6e-4, warmup_iters=100, lr_decay_iters=1000, min_lr=6e-5)


def test_lr_starts_small_and_positive():
    lr0 = lr_at(0, **SCHEDULE)
    assert 0 < lr0 <= SCHEDULE["learning_rate"] / SCHEDULE["warmup_iters"]


def test_lr_warmup_is_linear_and_increasing():
    lrs = [lr_at(it, **SCHEDULE) for it in range(SCHEDULE["warmup_iters"])]
    steps = [b - a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(s > 0 for s in steps)
    assert max(steps) - min(steps) < 1e-12  # equal steps: a straight line


def test_lr_peaks_at_the_end_of_warmup():
    assert lr_at(SCHEDULE["warmup_iters"], **SCHEDULE) == pytest.approx(SCHEDULE["learning_rate"])
    assert all(lr_at(it, **SCHEDULE) <= SCHEDULE["learning_rate"] + 1e-15 for it in range(0, 1200, 7))


def test_lr_cosine_midpoint_is_halfway():
    # cos(pi / 2) = 0: halfway through the decay the rate is the mean of learning_rate and min_lr.
    mid = (SCHEDULE["warmup_iters"] + SCHEDULE["lr_decay_iters"]) // 2
    assert lr_at(mid, **SCHEDULE) == pytest.approx((SCHEDULE["learning_rate"] + SCHEDULE["min_lr"]) / 2)
    quarter = SCHEDULE["warmup_iters"] + (SCHEDULE["lr_decay_iters"] - SCHEDULE["warmup_iters"]) // 4
    expected = SCHEDULE["min_lr"] + 0.5 * (1 + math.cos(math.pi / 4)) * (SCHEDULE["learning_rate"] - SCHEDULE["min_lr"])
    assert lr_at(quarter, **SCHEDULE) == pytest.approx(expected)


def test_lr_decays_monotonically_to_min_lr():
    lrs = [lr_at(it, **SCHEDULE) for it in range(SCHEDULE["warmup_iters"], SCHEDULE["lr_decay_iters"] + 1)]
    assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(SCHEDULE["min_lr"])
    for it in (SCHEDULE["lr_decay_iters"], SCHEDULE["lr_decay_iters"] + 1, 10**7):
        assert lr_at(it, **SCHEDULE) == pytest.approx(SCHEDULE["min_lr"])


def test_lr_constant_without_decay():
    for it in (0, 1, 50, 100, 999, 1000, 10**6):
        assert lr_at(it, **SCHEDULE, decay_lr=False) == SCHEDULE["learning_rate"]


def test_lr_without_warmup_starts_at_the_peak():
    assert lr_at(0, **(SCHEDULE | {"warmup_iters": 0})) == pytest.approx(SCHEDULE["learning_rate"])


@pytest.mark.parametrize("bias", [True, False])
def test_optimizer_groups_decay_matrices_only_and_hold_each_parameter_once(tiny_config, bias):
    config = GPTConfig(**(vars(tiny_config) | {"bias": bias}))
    model = GPT(config)
    opt = build_optimizer(model, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.9, 0.95)
    assert decay["params"] and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter appears twice"
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters() lists tied weights once
    assert set(in_groups) == set(names)
    decayed = {names[id(p)] for p in decay["params"]}
    assert "lm_head.weight" in decayed or "transformer.wte.weight" in decayed  # the tied matrix, once
    assert "transformer.wpe.weight" in decayed
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert all(".ln_" in n or n.endswith(".bias") for n in not_decayed)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == model.num_params(non_embedding=False)
    C = config.n_embd
    # Per block: ln_1 and ln_2 gains; with bias also their biases and those of c_attn (3C), c_proj, c_fc (4C), c_proj.
    per_block = 2 * C + (2 * C + 3 * C + C + 4 * C + C if bias else 0)
    expected_1d = config.n_layer * per_block + (2 * C if bias else C)  # + ln_f
    assert sum(p.numel() for p in no_decay["params"]) == expected_1d


def test_optimizer_skips_frozen_parameters(tiny_config):
    model = GPT(tiny_config)
    model.transformer.wpe.weight.requires_grad_(False)
    opt = build_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert all(p is not model.transformer.wpe.weight for g in opt.param_groups for p in g["params"])


def test_wsd_decay_that_would_start_inside_warmup_starts_after_it():
    # decay_fraction 0.8 of 100 iterations would start the decay at 20, inside the 50 warmup iterations: the rate
    # fell from 0.98 to 0.66 at once when warmup ended
    lr = [lr_at(i, 1.0, 50, 100, 0.1, schedule="wsd", decay_fraction=0.8) for i in range(101)]
    assert lr[50] == 1.0 and lr[100] == 0.1
    assert max(abs(a - b) for a, b in zip(lr, lr[1:], strict=False)) < 0.03
