"""Encoder-decoders (arch=encoder_decoder): T5 from the same model.py. The anchor is outside our code: random-weight
transformers T5ForConditionalGeneration models of both layouts (original T5: ReLU, tied output rescaled; v1.1: gated
GELU, untied) and our import of them give the same logits, padding included; our export loads back in transformers
with the same logits; the decoder's KV and cross-attention caches equal the uncached forward."""

import pytest
import torch

from engine.hf_interop import UnsupportedModel, from_pretrained, hf_format, save_hf
from model import GPT, GPTConfig, t5_buckets

transformers = pytest.importorskip("transformers")

LAYOUTS = {"t5": ("relu", True), "t5-v1_1": ("gated-gelu", False)}


def tiny_t5(tmp_path, layout: str) -> str:
    """A random-weight T5ForConditionalGeneration saved as a Hugging Face directory; every weight randomised."""
    ff, tie = LAYOUTS[layout]
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=ff,
        tie_word_embeddings=tie,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tie:  # transformers 5 ties the output layer whatever the argument: untie it as a v1.1 checkpoint is
        model.config.tie_word_embeddings, model.config.scale_decoder_outputs = False, False
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / layout
    model.save_pretrained(path)
    return str(path)


def test_t5_buckets_equal_transformers():
    relative = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            assert torch.equal(t5_buckets(relative, bidirectional, buckets, distance), theirs)


def batch():
    torch.manual_seed(1)
    src = torch.randint(2, 64, (3, 11))
    src[1, 8:], src[2, 4:] = 0, 0  # padded with <pad> (id 0)
    labels = torch.randint(2, 64, (3, 7))
    labels[0, 5:] = -1  # a shorter target
    return src, labels


@pytest.mark.parametrize("layout", LAYOUTS)
def test_t5_logits_equal_transformers_with_padding(layout, tmp_path):
    path = tiny_t5(tmp_path, layout)
    ours = from_pretrained(path).eval()
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    assert ours.config.arch == "encoder_decoder" and ours.config.n_dec_layer == 3
    src, labels = batch()
    with torch.no_grad():
        expected = theirs(input_ids=src, attention_mask=(src != 0).long(), labels=labels.masked_fill(labels < 0, -100))
        logits, loss = ours(src, labels)
    assert (logits - expected.logits).abs().max() < 1e-4
    assert abs(loss.item() - expected.loss.item()) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_exported_encoder_decoder_is_a_t5_with_the_same_logits(layout, tmp_path):
    ff, tie = LAYOUTS[layout]
    config = GPTConfig(
        arch="encoder_decoder", block_size=32, vocab_size=64, n_layer=2, n_dec_layer=1, n_head=4, n_embd=32,
        bias=False, pos_embedding="t5", rel_buckets=8, rel_max_distance=20, attn_scale=False, norm="rmsnorm",
        mlp={"relu": "relu", "gated-gelu": "geglu"}[ff], tie_embeddings=tie, pad_id=0,
    )  # fmt: skip
    torch.manual_seed(2)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert hf_format(config) == "t5"
    save_hf(model, str(tmp_path / "hf"))
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    src, labels = batch()
    with torch.no_grad():
        expected = theirs(input_ids=src, attention_mask=(src != 0).long(), labels=labels.masked_fill(labels < 0, -100))
        assert (model(src, labels)[0] - expected.logits).abs().max() < 1e-4
    back = from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.allclose(back(src, labels)[0], model(src, labels)[0], atol=1e-5)


def test_a_layout_t5_cannot_express_is_refused_naming_what_breaks():
    config = GPTConfig(arch="encoder_decoder", block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, pad_id=0)
    with pytest.raises(UnsupportedModel, match="pos_embedding=t5 .*norm=rmsnorm"):
        hf_format(config)


@pytest.mark.parametrize("static", [False, True])
def test_the_decoders_caches_equal_the_uncached_forward(static, tmp_path):
    model = from_pretrained(tiny_t5(tmp_path, "t5-v1_1")).eval()
    src, _ = batch()
    target = torch.randint(2, 64, (3, 6))
    with torch.no_grad():
        memory, keep = model.encode(src)
        full = model.decode(target, memory, keep)  # every position at once
        cache = model.new_kv_cache(3, length=8)
        steps = []
        for t in range(6):
            start = torch.tensor(t) if static else t
            steps.append(model.decode(target[:, t : t + 1], memory, keep, cache, start))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
