"""tools/sizing.py against numbers known outside the code: GPT-2 124M has 124,439,808 parameters; the parts add up to
the model's own count for every architecture; the FLOPs and memory formulas as written in the papers."""

import dataclasses
import json
import os

import pytest
import torch

from engine import runtime
from engine.configurator import load_preset, resolve_options
from engine.run_log import size_report
from model import GPT, GPTConfig
from tools import sizing
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpt2_closed_form(V: int, T: int, L: int = 12, C: int = 768) -> int:
    """GPT-2 with biases and tied embeddings, counted by hand: per block 2 LayerNorms (2C each), c_attn (3C^2 + 3C),
    attention c_proj (C^2 + C), c_fc (4C^2 + 4C) and MLP c_proj (4C^2 + C); plus wte, wpe and ln_f."""
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_block + 2 * C


def test_gpt2_124m():
    config = GPTConfig(vocab_size=50257, block_size=1024, bias=True)
    parts = sizing.param_counts(sizing.build_meta_model(config))
    assert sum(parts.values()) == 124_439_808 == gpt2_closed_form(50257, 1024)
    assert parts["lm_head"] == 0  # tied to wte
    assert parts["position"] == 1024 * 768 and parts["embeddings"] == 50257 * 768
    assert parts["norms"] == (2 * 12 + 1) * 2 * 768


def test_train_gpt2_preset_matches_model(capsys):
    argv = [os.path.join(ROOT, "config", "train_gpt2.py")]
    cfg = resolve_options(sizing.TRAIN_PY, argv)  # train.py's options, as sizing.main reads them
    config = GPTConfig.from_options(vars(cfg), cfg.vocab_size)
    model = sizing.build_meta_model(config)
    # the preset has bias=False (TrainConfig's default) and the padded vocabulary 50304
    biases = 2 * 768 + 3 * 768 + 768 + 4 * 768 + 768  # per block: ln_1, ln_2, c_attn, c_proj, c_fc, c_proj
    expected = gpt2_closed_form(50304, 1024) - 12 * biases - 768  # and ln_f's
    assert sum(sizing.param_counts(model).values()) == model.num_params(non_embedding=False) == expected
    sizing.main([*argv, "--gpu=A100", "--num_gpus=8"])
    text = capsys.readouterr().out
    assert f"{expected:,}" in text and "A100" in text and "Chinchilla" in text
    assert f"{5 * 8 * 12 * 1024:,}" in text  # tokens per iteration


@pytest.mark.parametrize(
    "switches",
    [
        {},
        dict(tie_embeddings=False),
        dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, qk_norm=True),
        dict(n_expert=4, n_expert_active=2, moe_shared_expert=True),
        dict(pos_embedding="alibi", norm_position="post"),
        dict(arch="encoder", norm_position="post", bias=True),
        dict(arch="encoder", tie_embeddings=False),
    ],
)
def test_parts_cover_the_model(tiny_config, switches):
    config = dataclasses.replace(tiny_config, **switches)
    parts = sizing.param_counts(sizing.build_meta_model(config))
    assert sum(parts.values()) == GPT(config).num_params(non_embedding=False)
    assert (parts["lm_head"] == 0) == (config.tie_embeddings and config.arch == "decoder")  # an encoder's MLM head


def test_flops_and_memory_formulas():
    config = GPTConfig(vocab_size=50257, block_size=1024, bias=True)
    model = sizing.build_meta_model(config)
    n = model.num_params()  # non-embedding in the GPT-2 sense: positions excluded
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    s, b, h, a, L, V = 1024, 8, 768, 12, 12, 50257
    assert (
        sizing.activation_bytes(config, b, checkpointing=False, flash=False)
        == L * (34 * s * b * h + 5 * a * s * s * b) + 6 * s * b * V
    )
    assert (
        sizing.activation_bytes(config, b, checkpointing=True, flash=True)
        == L * 2 * s * b * h + (34 * s * b * h) + 6 * s * b * V
    )
    assert sizing.gpu_peak_flops("NVIDIA H100 80GB HBM3") == sizing.gpu_peak_flops("h100") == 989e12
    assert sizing.gpu_peak_flops("H100 PCIe") == 756e12


def test_short_report_and_errors():
    cfg = TrainConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=100)
    model = GPT(GPTConfig.from_options(dataclasses.asdict(cfg), 65))
    text = size_report(model, 40 * 4 * 16, cfg.block_size, cfg.max_iters)
    n = model.num_params(non_embedding=False)
    assert text.count("\n") == 1 and f"{n:,} parameters" in text and f"{40 * 4 * 16:,} tokens/iter" in text
    with pytest.raises(sizing.UserError, match="unknown --gpu"):
        sizing.gpu_peak_flops("abacus")


def test_train_options_are_resolved_by_train_py(capsys):
    """The train.py part of the command line is train.py's own: its preset values, its validation and error line."""
    preset = os.path.join(ROOT, "config", "train_gpt2.py")
    with pytest.raises(sizing.UserError, match="batch_size must be >= 1"):
        sizing.main([preset, "--batch_size=0", "--gpu=H100"])
    sizing.main([preset, "--n_layer=6", "--gpu=H100", "--print_config"])
    options = json.loads(capsys.readouterr().out)
    assert options == dataclasses.asdict(TrainConfig(**load_preset(preset) | {"n_layer": 6})) | {
        "gpu": "H100",
        "num_gpus": 1,
        "mfu": 0.45,
    }


def test_gpu_names_are_normalised_and_cpu_is_measured():
    assert sizing.gpu_peak_flops("RTX 4090") == sizing.gpu_peak_flops("rtx4090") == sizing.gpu_peak_flops("RTX_4090")
    assert sizing.gpu_peak_flops("NVIDIA H100 80GB HBM3") == sizing.gpu_peak_flops("H100")
    assert 1e8 < sizing.gpu_peak_flops("cpu") < 1e14  # this machine's float32 matmul rate
    with pytest.raises(sizing.UserError, match="known: cpu, H200"):
        sizing.gpu_peak_flops("TPU v5")


def test_fsdp_divides_weights_gradients_and_optimizer_state_over_the_gpus(capsys):
    argv = [os.path.join(ROOT, "config", "train_gpt2.py"), "--gpu=A100", "--num_gpus=8"]
    sizing.main(argv)
    ddp = capsys.readouterr().out
    sizing.main([*argv, "--fsdp=True"])
    fsdp = capsys.readouterr().out

    def gib(text, label):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        return float(line.split()[-2])

    assert gib(fsdp, "AdamW state") == pytest.approx(gib(ddp, "AdamW state") / 8, abs=0.01)
    assert "FSDP 1/8" in fsdp and "FSDP" not in ddp


@pytest.mark.parametrize(
    "flags, divided",
    [
        ([], {"weights": 1, "gradients": 1, "AdamW state": 1}),
        (["--zero_stage=1"], {"weights": 1, "gradients": 1, "AdamW state": 8}),
        (["--zero_stage=2"], {"weights": 8, "gradients": 8, "AdamW state": 8}),
        (["--zero_stage=3"], {"weights": 8, "gradients": 8, "AdamW state": 8}),
        (["--fsdp=True", "--hsdp=4"], {"weights": 4, "gradients": 4, "AdamW state": 4}),
        (["--fsdp=True", "--cpu_offload=True"], {"weights": 8, "gradients": 8, "AdamW state": 8}),
    ],
)
def test_each_zero_stage_divides_its_parts_over_the_gpus(capsys, flags, divided):
    argv = [os.path.join(ROOT, "config", "train_gpt2.py"), "--gpu=A100", "--num_gpus=8"]
    sizing.main(argv)
    whole = capsys.readouterr().out
    sizing.main([*argv, *flags])
    out = capsys.readouterr().out

    def gib(text, label):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        return float(line.split()[-2])

    for part, by in divided.items():
        assert gib(out, part) == pytest.approx(gib(whole, part) / by, abs=0.01), part
    n = 124_475_904  # GPT-2 124M with the preset's vocabulary of 50304: the weights gathered in bf16
    gathered = {"--zero_stage=2": n * 2, "--zero_stage=3": n * 2 / 12}.get(flags[0] if flags else "", None)
    if gathered:
        assert gib(out, "weights gathered") == pytest.approx(gathered / 2**30, abs=0.01)
    assert ("CPU memory" in out) == ("--cpu_offload=True" in flags)


def test_a_cpu_run_is_sized_for_the_cpu_not_an_a100(capsys):
    sizing.main([os.path.join(ROOT, "config", "train_shakespeare_char_cpu.py"), "--device=cpu", "--vocab_size=65"])
    out = capsys.readouterr().out
    assert "time on 1 x cpu, " in out and "A100" not in out
    timed = next(line for line in out.splitlines() if "timed here" in line)  # a small CPU run's step is timed
    assert float(timed.split()[-2]) > 0


def row_value(text: str, label: str) -> float:
    return float(next(line for line in text.splitlines() if line.strip().startswith(label)).split()[-2])


def test_a_cpu_run_is_estimated_at_its_dtypes_matmul_rate_and_timed_when_small(capsys, monkeypatch):
    rates = {torch.float32: 1e11, torch.bfloat16: 2e11}
    monkeypatch.setattr(sizing, "measured_cpu_flops", lambda dtype=torch.float32: rates[dtype])
    calls = []
    monkeypatch.setattr(sizing, "measure", lambda argv, **kw: calls.append(argv) or {"ms_per_iter": 50.0})
    argv = [os.path.join(ROOT, "config", "train_shakespeare_char_cpu.py"), "--device=cpu", "--vocab_size=65"]

    sizing.main([*argv, "--dtype=float32"])
    fp32 = capsys.readouterr().out
    sizing.main([*argv, "--dtype=bfloat16"])
    bf16 = capsys.readouterr().out
    assert "x cpu, float32 (0.10 TFLOP/s" in fp32 and "x cpu, bfloat16 (0.20 TFLOP/s" in bf16
    estimate = "step, estimated"
    assert row_value(bf16, estimate) == pytest.approx(row_value(fp32, estimate) / 2, rel=0.01)
    # the timed step is train.py's own, eager, on the CPU, in the run's dtype; the totals follow it
    assert calls[-1][-3:] == ["--dtype=bfloat16", "--device=cpu", "--compile=False"]
    assert row_value(bf16, "step, timed here") == 50.0
    rate = next(line for line in bf16.splitlines() if "tokens per second" in line).split()[-1]
    assert float(rate.replace(",", "")) == pytest.approx(12 * 64 / 0.05, rel=1e-3)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)  # dtype=auto trains in bf16 on a CPU with AMX
    sizing.main(argv)
    assert "x cpu, bfloat16" in capsys.readouterr().out
    # GPT-2 on a CPU (seconds per step), LoRA (bench's step trains every weight) and 2 processes are estimated only
    sizing.main([os.path.join(ROOT, "config", "train_gpt2.py"), "--device=cpu"])  # bf16 (AMX patched on above)
    gpt2 = capsys.readouterr().out  # untimed in bf16: costed at the fp32 rate, twice the bf16-peak estimate here
    assert row_value(gpt2, "step at the float32 rate") == pytest.approx(2 * row_value(gpt2, estimate), rel=1e-3)
    sizing.main([*argv, "--lora_rank=4"])
    sizing.main([*argv, "--num_gpus=2"])
    assert "timed here" not in capsys.readouterr().out and len(calls) == 3
    assert 1e8 < sizing.measured_cpu_flops(torch.bfloat16) < 1e15  # the real measurement runs in bf16 too
