"""engine/generate.py and sample.py: the KV cache against full recomputation, sampling filters against their
definitions, stop strings, batching, seeds and UTF-8-safe streaming, and greedy decoding against transformers'
generate on the same GPT-2 weights."""

import pytest
import torch
from conftest import needs_gpt2_tokenizer, random_tokens

import sample
from engine.checkpoint import save_checkpoint
from engine.data import Tokenizer
from engine.generate import (
    Sampling,
    StreamDecoder,
    apply_repetition_penalty,
    cut_at_stop,
    extend,
    filter_logits,
    generate,
    next_token,
)
from engine.hf_interop import from_pretrained
from model import GPT, GPTConfig

SWITCHES = [
    {},
    {"pos_embedding": "sinusoidal"},
    {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False},
    {"pos_embedding": "alibi"},
    {"pos_embedding": "none", "qk_norm": True},
    {"n_kv_head": 1, "norm_position": "post", "mlp": "relu2"},
    {"n_expert": 4, "n_expert_active": 2, "moe_shared_expert": True},
    {"pos_embedding": "t5", "attn_scale": False, "mlp": "geglu", "rel_buckets": 8, "rel_max_distance": 12},
]


def tiny(seed=0, **switches) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, **switches)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than the init, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4) if p.dim() > 1 else None
    return model


GREEDY = Sampling(temperature=0)


def run(model, idx, n, sampling=GREEDY, kv_cache=True, generator=None):
    return torch.cat([idx, *generate(model, idx, n, sampling, kv_cache, generator)], dim=1)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "gpt2")
def test_cached_equals_uncached_greedy_also_past_block_size(switches):
    model = tiny(**switches)
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = run(model, prompt, 30)  # 35 tokens: twice past block_size 16
    uncached = run(model, prompt, 30, kv_cache=False)
    assert torch.equal(cached, uncached)
    # the uncached path itself: argmax of a full forward over the last block_size tokens
    expected = prompt
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(expected[:, -16:])
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(uncached, expected)


def test_cache_prefill_then_steps_equals_full_forward():
    model = tiny(pos_embedding="rope", n_kv_head=2)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        full, _ = model(x, all_logits=True)
        cache = model.new_kv_cache(2)
        parts = [
            model(x[:, :7], kv_cache=cache, all_logits=True)[0],
            model(x[:, 7:10], kv_cache=cache, start_pos=7, all_logits=True)[0],
        ]
        parts += [model(x[:, t : t + 1], kv_cache=cache, start_pos=t)[0] for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_top_k_1_is_greedy_and_batched_equals_one_by_one():
    model = tiny()
    prompts = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(2))
    greedy = run(model, prompts, 12)
    assert torch.equal(run(model, prompts, 12, Sampling(temperature=1.0, top_k=1)), greedy)
    one_by_one = torch.cat([run(model, prompts[i : i + 1], 12) for i in range(4)])
    assert torch.equal(greedy, one_by_one)


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = tiny()
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def sampled(seed):
        return run(model, prompt, 20, Sampling(temperature=1.0), generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sampled(7), sampled(7))
    assert not torch.equal(sampled(7), sampled(8))


def kept(logits, **kwargs) -> set[int]:
    out = filter_logits(torch.log(torch.tensor([logits])), Sampling(**kwargs))
    return set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist())


def test_top_p_and_min_p_keep_exactly_the_expected_tokens():
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: token 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    assert kept(probs, top_p=0.5) == {1}
    assert kept(probs, top_p=0.8) == {1, 3}
    assert kept(probs, top_p=0.81) == {1, 3, 2}
    assert kept(probs, top_p=1.0) == {0, 1, 2, 3}
    assert kept(probs, min_p=0.5) == {1, 3}  # >= 0.5 * 0.5
    assert kept(probs, min_p=0.3) == {1, 3, 2}
    assert kept(probs, min_p=0.0) == {0, 1, 2, 3}
    assert kept(probs, top_k=2) == {1, 3}
    assert kept(probs, top_k=3, top_p=0.5) == {1}


def test_filtered_distribution_is_renormalised_original():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    out = torch.softmax(filter_logits(probs.log(), Sampling(top_p=0.8)), dim=-1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]]))


def test_repetition_penalty_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    seen = torch.tensor([[0, 1, 1, 3]])  # token 1 twice: penalised once, as CTRL does
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 4.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # it changes greedy choices: token 0 (2.0) loses to token 4 only if 4 was unseen
    assert (
        next_token(
            torch.tensor([[3.0, 2.5]]), Sampling(temperature=0, repetition_penalty=2.0), torch.tensor([[0]])
        ).item()
        == 1
    )


def test_cut_at_stop():
    assert cut_at_stop("hello world\n\nmore", ["\n\n"]) == ("hello world", True)
    assert cut_at_stop("abcdef", ["de", "bc"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


@needs_gpt2_tokenizer
def test_stream_decoder_never_prints_half_a_character():
    tok = Tokenizer({"tokenizer": "gpt2", "eot_id": 50256})
    text = "naïve café 東京 🤖 – ok"
    ids = tok.encode(text)
    assert any(
        b"\xef\xbf\xbd" in tok.enc.decode(ids[i : i + 1]).encode() for i in range(len(ids))
    )  # tokens split chars
    decoder = StreamDecoder(tok.token_bytes)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture
def char_checkpoint(tmp_path):
    chars = "\n !abcdefghijklmnopqrstuvwxyz"
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(chars), n_layer=1, n_head=2, n_embd=16))
    data = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars), "eot_id": None}
    save_checkpoint(
        str(tmp_path), 1, model, {}, {"model_config": model.config.__dict__, "train_config": {}, "data": data}
    )
    return str(tmp_path)


def samples(capsys) -> list[str]:
    return capsys.readouterr().out.split("---------------\n")[:-1]


def test_sample_cli_seed_stop_and_stream(char_checkpoint, capsys):
    base = [f"--out_dir={char_checkpoint}", "--device=cpu", "--max_new_tokens=60", "--start=ab", "--temperature=1.5"]
    sample.main([*base, "--num_samples=3", "--seed=3"])
    first = samples(capsys)
    sample.main([*base, "--num_samples=3", "--seed=3"])
    assert samples(capsys) == first and len(first) == 3
    sample.main([*base, "--num_samples=3", "--seed=4"])
    assert samples(capsys) != first
    # stop strings: each sample is cut before its first " " (when it has one)
    sample.main([*base, "--num_samples=3", "--seed=3", "--stop= |q"])
    for full, cut in zip(first, samples(capsys), strict=True):
        expected = "ab" + cut_at_stop(full[2:].rstrip("\n"), [" ", "q"])[0]
        assert cut.rstrip("\n") == expected
    # streaming prints the same text as the batch path for one sample
    sample.main([*base, "--num_samples=1", "--seed=5"])
    batch = samples(capsys)
    sample.main([*base, "--num_samples=1", "--seed=5", "--stream=True"])
    assert samples(capsys) == batch
    sample.main([*base, "--num_samples=1", "--seed=5", "--kv_cache=False"])
    assert samples(capsys) == batch


@pytest.mark.parametrize("switches", [{}, {"pos_embedding": "alibi"}, {"pos_embedding": "rope", "n_kv_head": 2}])
def test_static_shape_decoding_equals_dynamic(switches, monkeypatch):
    """The compile path's static shapes (tensor positions, whole-buffer attention under a mask), run eagerly."""
    model = tiny(**switches)
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(3))
    dynamic = run(model, prompt, 25)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the same code path, without compiling
    static = torch.cat([prompt, *generate(model, prompt, 25, GREEDY, compile=True)], dim=1)
    assert torch.equal(static, dynamic)


@pytest.mark.slow
def test_compiled_decoding_equals_eager():
    """torch.compile of the static decoding step (inductor on CPU; CUDA graphs on a GPU) gives the same tokens."""
    model = tiny(pos_embedding="rope", n_kv_head=2)
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(4))
    compiled = torch.cat([prompt, *generate(model, prompt, 10, GREEDY, compile=True)], dim=1)
    assert torch.equal(compiled, run(model, prompt, 10))


# --- extend on the model: greedy, seeds, cropping, the filters; greedy against transformers' generate -----------------


def test_greedy_generate_equals_argmax_chain(tiny_model, tiny_config):
    idx = random_tokens(tiny_config, 2, 5)
    out = extend(tiny_model, idx, 8, Sampling(temperature=0))
    expected = idx
    with torch.no_grad():
        for _ in range(8):
            logits, _ = tiny_model(expected)
            expected = torch.cat([expected, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_top_k_1_sampling_equals_greedy(tiny_model, tiny_config):
    idx = random_tokens(tiny_config, 2, 5)
    greedy = extend(tiny_model, idx, 8, Sampling(temperature=0))
    assert torch.equal(extend(tiny_model, idx, 8, Sampling(temperature=1.0, top_k=1)), greedy)


def test_sampling_is_a_function_of_the_torch_seed(tiny_model, tiny_config):
    idx = random_tokens(tiny_config, 2, 3)
    torch.manual_seed(123)
    a = extend(tiny_model, idx, 12, Sampling(temperature=1.0))
    torch.manual_seed(123)
    b = extend(tiny_model, idx, 12, Sampling(temperature=1.0))
    torch.manual_seed(456)
    c = extend(tiny_model, idx, 12, Sampling(temperature=1.0))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_past_block_size_crops_the_context(tiny_model, tiny_config):
    T = tiny_config.block_size
    idx = random_tokens(tiny_config, 1, T - 2)
    out = extend(tiny_model, idx, 10, Sampling(temperature=0))
    assert out.shape == (1, T + 8)
    expected = idx
    with torch.no_grad():
        for _ in range(10):
            logits, _ = tiny_model(expected[:, -T:])  # the model only ever sees the last block_size tokens
            expected = torch.cat([expected, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def kept_distribution(monkeypatch, logits, **kwargs) -> torch.Tensor:
    """The probabilities next_token hands to torch.multinomial."""
    seen = []
    real = torch.multinomial

    def spy(probs, num_samples, **kwargs):
        seen.append(probs.clone())
        return real(probs, num_samples, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    next_token(logits, Sampling(**kwargs), torch.zeros(logits.size(0), 0, dtype=torch.long))
    assert len(seen) == 1
    return seen[0][0]


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.5, 1), (0.75, 2), (0.8, 2), (0.85, 3), (0.96, 4), (1.0, 4)],
)
def test_top_p_keeps_the_smallest_set_reaching_p(monkeypatch, top_p, kept):
    # Nucleus sampling (Holtzman et al. 2019): the most likely tokens whose total probability first reaches p.
    order = torch.tensor([2, 0, 3, 1])  # shuffled, so the kept set is not simply a prefix of the vocabulary
    logits = PROBS[order].log()[None]
    probs = kept_distribution(monkeypatch, logits, temperature=1.0, top_p=top_p)
    expected = torch.zeros(4)
    expected[:kept] = PROBS[:kept] / PROBS[:kept].sum()
    torch.testing.assert_close(probs, expected[order], rtol=1e-5, atol=1e-6)


def test_top_k_and_temperature_shape_the_distribution(monkeypatch):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    probs = kept_distribution(monkeypatch, logits, temperature=0.5, top_k=2)
    expected = torch.zeros(5)
    expected[[1, 2]] = torch.softmax(torch.tensor([3.0, 2.0]) / 0.5, dim=0)
    torch.testing.assert_close(probs, expected)


def test_greedy_generate_matches_transformers_gpt2(hf_gpt2):
    hf, directory = hf_gpt2
    ours = from_pretrained(directory).eval()
    idx = torch.randint(100, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=20, pad_token_id=0)
    out = extend(ours, idx, 20, Sampling(temperature=0))
    assert out.shape == expected.shape == (2, 26)
    assert torch.equal(out, expected)
    assert len(set(out[:, 6:].flatten().tolist())) > 1  # the continuation is not one repeated token
