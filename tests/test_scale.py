"""Scale and speed features on CPU: gradient checkpointing (same maths), Muon and WSD (they train), FP8 (refused
without the hardware), FSDP2 over 2 gloo ranks (trains; its checkpoint loads in one process and in sample.py)."""

import json
import os

import pytest
import torch
from test_distributed import CONFIG, rank_logs, torchrun

import sample
import train
from engine.checkpoint import find_checkpoint, read_meta
from engine.errors import UserError
from engine.optim import build_optimizers, lr_at


def losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def run(char_data, out, *extra):
    base = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG]
    return train.main([*base, "--gradient_accumulation_steps=2", *extra])


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_losses(char_data, tmp_path, every):
    run(char_data, tmp_path / "plain", "--dropout=0.1", "--n_layer=3")
    run(
        char_data,
        tmp_path / "ckpt",
        "--dropout=0.1",
        "--n_layer=3",
        "--gradient_checkpointing=True",
        f"--recompute_every={every}",
    )
    plain, ckpt = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert len(plain) == 6
    for a, b in zip(plain, ckpt, strict=True):
        assert abs(a - b) <= 1e-6


def test_gradient_checkpointing_recomputes_blocks(tiny_config):
    """Checkpointed blocks run their forward twice (once more in the backward pass)."""
    from model import GPT

    model = GPT(tiny_config)
    calls = []
    for block in model.transformer.h:  # count forward calls (module hooks do not fire during recomputation)

        def counted(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)

        block.forward = counted
    x = torch.randint(0, 65, (2, 16))
    model(x, x)[1].backward()
    assert len(calls) == 2
    calls.clear()
    model.recompute_every = 1
    model(x, x)[1].backward()
    assert len(calls) == 4


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer=muon"],
        ["--lr_schedule=wsd", "--decay_fraction=0.5"],
        ["--optimizer=muon", "--lr_schedule=constant"],
    ],
)
def test_muon_and_wsd_train(char_data, tmp_path, extra):
    out = tmp_path / "out"
    run(char_data, out, "--max_iters=40", "--eval_interval=40", "--lr_decay_iters=40", "--log_interval=1", *extra)
    seen = losses(out)
    assert sum(seen[-5:]) / 5 < seen[0] - 0.5


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tiny_config):
    from model import GPT

    model = GPT(tiny_config)
    muon, adamw = build_optimizers(model, "muon", 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names)
    assert all(names[i].startswith("transformer.h.") and model.get_parameter(names[i]).dim() == 2 for i in in_muon)
    assert id(model.lm_head.weight) in in_adamw and id(model.transformer.wte.weight) in in_adamw


def test_muon_leaves_moe_routers_to_adamw(tiny_config):
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(**(tiny_config.__dict__ | {"n_expert": 4})))
    muon, adamw = build_optimizers(model, "muon", 0.1, 1e-3, (0.9, 0.95), "cpu")
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for block in model.transformer.h:
        assert id(block.mlp.router.weight) in in_adamw
        assert id(block.mlp.experts[0].c_fc.weight) in in_muon


def test_muon_orthogonalises_q_k_and_v_each_on_its_own(tiny_config):
    """The fused c_attn weight is q, k and v stacked: two Muon steps on it must equal plain torch.optim.Muon stepping
    each block as its own matrix (own Newton-Schulz, own shape's learning-rate scale), grouped-query blocks too."""
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(**(tiny_config.__dict__ | {"n_head": 4, "n_kv_head": 1})))
    muon, _ = build_optimizers(model, "muon", 0.1, 1e-2, (0.9, 0.95), "cpu")
    weight = model.transformer.h[0].attn.c_attn.weight
    C, kv = 32, 8
    assert weight.shape == (C + 2 * kv, C)
    blocks = [torch.nn.Parameter(b.detach().clone()) for b in weight.split([C, kv, kv])]
    reference = torch.optim.Muon(blocks, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(2):
        grad = torch.randn_like(weight)
        for p in muon.param_groups[0]["params"]:
            p.grad = grad if p is weight else torch.zeros_like(p)
        for b, g in zip(blocks, grad.split([C, kv, kv]), strict=True):
            b.grad = g.clone()
        muon.step()
        reference.step()
    torch.testing.assert_close(weight.detach(), torch.cat([b.detach() for b in blocks]), rtol=0, atol=1e-6)


def test_wsd_schedule_endpoints():
    lr = [lr_at(i, 1.0, 10, 100, 0.1, schedule="wsd", decay_fraction=0.2) for i in range(120)]
    assert lr[9] < 1.0 and lr[10] == lr[79] == lr[80] == 1.0
    assert lr[90] == pytest.approx(0.55) and lr[100] == lr[119] == 0.1
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    assert [lr_at(i, 1.0, 10, 100, 0.1, schedule="constant") for i in (10, 99, 150)] == [1.0, 1.0, 1.0]


def test_fp8_is_refused_without_the_hardware(char_data, tmp_path):
    with pytest.raises(UserError, match="fp8 needs an NVIDIA GPU"):
        run(char_data, tmp_path / "out", "--fp8=True")


def test_changing_the_optimizer_on_resume_is_refused(char_data, tmp_path):
    run(char_data, tmp_path / "out")
    with pytest.raises(UserError, match="optimizer"):
        run(char_data, tmp_path / "out", "--init_from=resume", "--optimizer=muon", "--max_iters=8")


@pytest.mark.slow
def test_fsdp_two_ranks_train_and_save_a_full_checkpoint(char_data, tmp_path, capsys):
    out = tmp_path / "fsdp"
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG]
    result = torchrun(tmp_path, *data, "--fsdp=True", "--gradient_accumulation_steps=2", "--eval_iters=3")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))[-3000:]
    fsdp_losses = losses(out)
    run(char_data, tmp_path / "single")  # the same global batch in one process
    single = losses(tmp_path / "single")
    assert fsdp_losses == pytest.approx(single, rel=1e-4, abs=1e-5)
    # the checkpoint is the full model: one process resumes it and sample.py loads it
    path = find_checkpoint(str(out))
    assert read_meta(path)["iter_num"] == 6
    assert run(char_data, out, "--init_from=resume", "--max_iters=8") == 0
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5"])
    assert capsys.readouterr().out.count("---------------") == 1


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_fsdp_exactly(char_data, tmp_path):
    """One checkpoint format (optimizer state keyed by parameter name) for every mode: 6 iterations in one process
    then 2 more under 2-rank FSDP give the losses of 8 in one process."""
    run(char_data, tmp_path / "whole", "--max_iters=8", "--eval_interval=8", "--lr_decay_iters=8")
    out = tmp_path / "mixed"
    run(char_data, out, "--lr_decay_iters=8")
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG]
    data += ["--max_iters=8", "--eval_interval=8", "--lr_decay_iters=8", "--gradient_accumulation_steps=2"]
    result = torchrun(tmp_path, *data, "--fsdp=True", "--init_from=resume")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))[-3000:]
    whole, mixed = losses(tmp_path / "whole"), losses(out)
    assert len(whole) == len(mixed) == 8
    assert mixed == pytest.approx(whole, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["--fsdp=True", "--zero_stage=2"])
def test_fsdp_with_compile_in_bf16_trains_like_one_eager_process(char_data, tmp_path, stage):
    """FSDP2 + torch.compile + bf16: blocks compiled before sharding, a bf16/fp32 mixed-precision policy. The losses
    follow one eager bf16 process closely (bf16 rounding differs between the two, hence the tolerance)."""
    out = tmp_path / "fsdp"
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG, "--dtype=bfloat16"]
    result = torchrun(tmp_path, *data, stage, "--compile=True", "--gradient_accumulation_steps=2")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))[-3000:]
    run(char_data, tmp_path / "single", "--dtype=bfloat16")
    assert losses(out) == pytest.approx(losses(tmp_path / "single"), rel=2e-2)
    assert "Graph break" not in "".join(rank_logs(tmp_path, "stderr"))
