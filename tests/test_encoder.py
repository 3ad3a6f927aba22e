"""Encoders (arch=encoder): a BERT-style masked-language model from the same model.py. The anchor is outside our
code: a random-weight transformers BertForMaskedLM and our import of it give the same logits, padding included."""

import pytest
import torch

from engine.hf_interop import from_pretrained
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def tiny_bert(tmp_path, **overrides) -> str:
    """A random-weight BertForMaskedLM saved as a Hugging Face directory; every weight (norms, biases, token types
    included) randomised, so a mapping that drops or swaps one shows in the logits."""
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        hidden_act="gelu",
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "bert"
    model.save_pretrained(path)
    return str(path)


def test_an_encoder_is_bidirectional_and_a_decoder_is_not():
    torch.manual_seed(0)
    for arch, sees_the_future in (("encoder", True), ("decoder", False)):
        model = GPT(GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).eval()
        x = torch.randint(0, 64, (1, 8))
        y = x.clone()
        y[0, -1] = (x[0, -1] + 1) % 64  # only the last token differs
        first = model(x, all_logits=True)[0][0, 0], model(y, all_logits=True)[0][0, 0]
        assert (not torch.equal(*first)) == sees_the_future, arch


def test_bert_logits_equal_transformers_with_padding(tmp_path):
    path = tiny_bert(tmp_path)
    ours = from_pretrained(path).eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(path).eval()
    assert ours.config.arch == "encoder"
    torch.manual_seed(1)
    ids = torch.randint(0, 99, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # the second sequence is padded after 9 tokens, the third after 5
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, padding_mask=mask.bool(), all_logits=True)[0]
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4  # padding positions' outputs are nobody's business


def test_an_encoder_refuses_the_kv_cache_in_one_line():
    model = GPT(GPTConfig(arch="encoder", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    with pytest.raises(ValueError, match="an encoder has no KV cache"):
        model.new_kv_cache(1)
