"""engine/attention.py's recomputed attention probabilities against the model's own SDPA path, for every switch that
touches attention: A @ V through c_proj must give the attention module's output; rows are distributions; nothing
attends to the future. Their entropy by its definition. Plus tools/attention.py's command line end to end."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from engine.attention import attention_weights, entropy
from engine.checkpoint import save_checkpoint
from engine.data import load_data
from model import GPT
from tools import attention

SWITCHES = {
    "learned": {},
    "sinusoidal": dict(pos_embedding="sinusoidal"),
    "rope": dict(pos_embedding="rope"),
    "alibi": dict(pos_embedding="alibi", n_head=4),  # four different slopes
    "none": dict(pos_embedding="none"),
    "gqa": dict(n_head=4, n_kv_head=2),
    "mqa": dict(n_head=4, n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "moe": dict(n_expert=4, n_expert_active=2),
    "post_norm": dict(norm_position="post"),
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, qk_norm=True),
    "encoder": dict(arch="encoder", norm_position="post"),  # bidirectional: health's attention entropy for encoders
    "encoder_alibi": dict(arch="encoder", pos_embedding="alibi", n_head=4),
    "encoder_rope_gqa": dict(arch="encoder", pos_embedding="rope", n_head=4, n_kv_head=2),
    "t5_unscaled": dict(pos_embedding="t5", attn_scale=False, n_head=4, rel_buckets=8, rel_max_distance=16),
    "encoder_t5": dict(arch="encoder", pos_embedding="t5", attn_scale=False, n_head=4),
}


@pytest.mark.parametrize("name", SWITCHES)
def test_weights_reproduce_sdpa_output(tiny_config, name):
    model = GPT(dataclasses.replace(tiny_config, **SWITCHES[name])).eval()
    idx = torch.randint(tiny_config.vocab_size, (2, 12))
    captured = []  # (input, output) of every attention module in the model's own forward

    def hook(module, args, output):
        captured.append((args[0], output))

    hooks = [block.attn.register_forward_hook(hook) for block in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    weights = attention_weights(model, idx)

    assert len(weights) == len(captured) == model.config.n_layer
    for block, probs, (x, out) in zip(model.transformer.h, weights, captured, strict=True):
        attn = block.attn
        B, T, C = x.shape
        assert probs.shape == (B, attn.n_head, T, T)
        assert torch.allclose(probs.sum(-1), torch.ones(B, attn.n_head, T), atol=1e-6)
        assert (probs.triu(diagonal=1) == 0).all() == attn.causal  # a decoder puts no weight on later keys
        v = attn.c_attn(x).split([attn.n_head * attn.hs, attn.n_kv_head * attn.hs, attn.n_kv_head * attn.hs], 2)[2]
        v = v.view(B, T, attn.n_kv_head, attn.hs).transpose(1, 2).repeat_interleave(attn.n_head // attn.n_kv_head, 1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
        assert torch.allclose(attn.c_proj(y), out, atol=1e-5), name


def test_entropy_is_its_definition():
    T = 4
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # query i spreads over i + 1 keys
    assert entropy(uniform).tolist() == pytest.approx([math.log(n) for n in range(1, T + 1)])
    probs = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy(probs), expected)


def test_cli_writes_png_and_npy(char_data, tiny_config, tmp_path, capsys):
    data = load_data(os.path.join(char_data, "tiny_char"), tiny_config.block_size)
    model = GPT(dataclasses.replace(tiny_config, vocab_size=data.meta["vocab_size"]))
    meta = {"model_config": dataclasses.asdict(model.config), "train_config": {}, "data": data.fingerprint()}
    save_checkpoint(str(tmp_path / "out"), 1, model, {}, meta)
    png = tmp_path / "attn.png"
    attention.main([f"--out_dir={tmp_path / 'out'}", "--start=ROMEO:", "--heads=1", f"--png={png}"])
    assert "wrote" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = np.load(tmp_path / "attn.npy")
    assert weights.shape == (2, 1, 6, 6)  # layers, chosen heads, T, T for the 6 characters of ROMEO:
    assert np.allclose(weights.sum(-1), 1, atol=1e-5)
