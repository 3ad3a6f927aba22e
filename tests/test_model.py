"""The model against things outside it: maths (ln V at init, causality, attention written out by hand, an
overfitted batch), GPT-2's published init, and transformers' GPT2LMHeadModel on the same weights."""

import math

import pytest
import torch
from conftest import random_tokens
from torch.nn import functional as F

from engine.hf_interop import from_pretrained
from model import GPT, GPTConfig, KVCache


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread is fastest, and immune to a busy machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- forward ----------------------------------------------------------------------------------------------------------


def test_forward_without_targets_returns_the_last_position_or_all_and_no_loss(tiny_model, tiny_config):
    idx = random_tokens(tiny_config, 3, 10)
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 1, tiny_config.vocab_size)  # as nanoGPT: only the next token's logits
    assert logits.dtype == torch.float32
    assert loss is None
    every, _ = tiny_model(idx, all_logits=True)
    assert every.shape == (3, 10, tiny_config.vocab_size)
    torch.testing.assert_close(every[:, -1:], logits)


def test_sequence_longer_than_block_size_is_rejected(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(random_tokens(tiny_config, 1, tiny_config.block_size + 1))


def test_loss_at_init_is_near_ln_vocab(tiny_config):
    # With std-0.02 weights the logits are nearly uniform, so cross-entropy ~ ln(V) (= 4.17 for V = 65).
    model = GPT(tiny_config).eval()
    losses = []
    for seed in range(4):
        x = random_tokens(tiny_config, 8, seed=seed)
        y = random_tokens(tiny_config, 8, seed=100 + seed)
        _, loss = model(x, y)
        losses.append(loss.item())
    assert abs(sum(losses) / len(losses) - math.log(tiny_config.vocab_size)) < 0.3


def test_loss_is_mean_cross_entropy_over_non_ignored_targets(tiny_model, tiny_config):
    x = random_tokens(tiny_config, 2, 12)
    y = random_tokens(tiny_config, 2, 12, seed=1)
    y[0, :5] = -1
    y[1, 7:] = -1
    logits, loss = tiny_model(x, y)
    logp = torch.log_softmax(logits, dim=-1)
    keep = y != -1
    expected = -logp[keep].gather(1, y[keep][:, None]).mean()  # written out: mean of -log p(target)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Only one target left: the loss is that single token's -log p.
    y1 = torch.full_like(y, -1)
    y1[1, 3] = y[1, 3]
    _, loss1 = tiny_model(x, y1)
    torch.testing.assert_close(loss1, -logp[1, 3, y[1, 3]], rtol=1e-5, atol=1e-6)


def test_causality_changing_token_t_changes_only_positions_from_t(tiny_model, tiny_config):
    t = 7
    idx = random_tokens(tiny_config, 2)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny_config.vocab_size
    before, _ = tiny_model(idx, all_logits=True)
    after, _ = tiny_model(changed, all_logits=True)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    diff = (after - before).abs().amax(dim=(0, 2))  # (T,) largest change per position
    assert (diff[t:] > 1e-4).all(), diff


def manual_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Causal self-attention from the module's own weights, written out: softmax(q k^T / sqrt(hs) + mask) v."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias  # (B, T, 3C)
    q, k, v = (t.reshape(B, T, nh, hs).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1))  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    return y @ attn.c_proj.weight.T + attn.c_proj.bias


def test_sdpa_attention_equals_manual_masked_softmax(tiny_model, tiny_config):
    attn = tiny_model.transformer.h[1].attn
    with torch.no_grad():  # larger weights than the init, so the softmax is far from uniform
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
        x = torch.randn(3, tiny_config.block_size, tiny_config.n_embd)
        torch.testing.assert_close(attn(x), manual_attention(attn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos_embedding", ["learned", "alibi"])  # alibi: a float bias as the mask
def test_cpu_bf16_training_runs_attention_in_float32(tiny_config, pos_embedding):
    """torch's CPU flash attention runs its backward slower in bf16 than in fp32 at short contexts, so under bf16
    autocast a training forward on CPU attends in float32 (exactly fp32 SDPA, cast back); inference stays bf16."""
    config = GPTConfig(**{**tiny_config.__dict__, "pos_embedding": pos_embedding})
    model = GPT(config)
    attn = model.transformer.h[0].attn
    q, k, v = (torch.randn(2, 2, 16, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = model.attention_mask(torch.arange(16), 16, 0, torch.bfloat16) if pos_embedding == "alibi" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn.attend(q, k, v, mask)
        with torch.no_grad():
            y_inference = attn.attend(q, k, v, mask)
    fp32_mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    reference = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=fp32_mask, is_causal=mask is None
    )
    assert y.dtype == torch.bfloat16 and torch.equal(y, reference.bfloat16())
    y.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    bf16_reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    assert torch.equal(y_inference.detach(), bf16_reference.detach())


def test_overfits_one_small_batch(tiny_config):
    # 64 random targets: a working model and optimizer memorise them (the loss -> 0), a broken one stays near ln V.
    model = GPT(tiny_config)
    x = random_tokens(tiny_config, 4)
    y = random_tokens(tiny_config, 4, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    assert torch.equal(logits.argmax(dim=-1), y)


# --- structure and init -----------------------------------------------------------------------------------------------


def test_token_embedding_is_tied_to_lm_head(tiny_model):
    assert tiny_model.transformer.wte.weight is tiny_model.lm_head.weight
    n_unique = sum(p.numel() for p in tiny_model.parameters())  # parameters() lists a shared tensor once
    assert tiny_model.num_params(non_embedding=False) == n_unique


def test_gpt2_scaled_init_of_residual_projections():
    # GPT-2: residual projections are initialised with std 0.02 / sqrt(2 * n_layer); other matrices with 0.02.
    config = GPTConfig(block_size=16, vocab_size=256, n_layer=4, n_head=2, n_embd=64)
    model = GPT(config)
    c_proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    others = torch.cat(
        [p.flatten() for n, p in model.named_parameters() if n.endswith(("c_attn.weight", "c_fc.weight"))]
    )
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    assert c_proj.std().item() == pytest.approx(expected, rel=0.05)
    assert others.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases and all((b == 0).all() for b in biases)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(block_size=0), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_gpt_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


# --- parity with transformers' GPT-2 ----------------------------------------------------------------------------------


def test_logits_match_transformers_gpt2(hf_gpt2):
    hf, directory = hf_gpt2
    ours = from_pretrained(directory).eval()
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 100 and ours.config.block_size == 32
    idx = torch.randint(100, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx, all_logits=True)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (logits - expected).abs().max().item() < 1e-4


def test_hf_gelu_new_is_torch_tanh_gelu():
    # GPT-2's activation (transformers' "gelu_new") is the tanh approximation our MLP uses.
    activations = pytest.importorskip("transformers.activations", reason="transformers is needed for this check")
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(activations.ACT2FN["gelu_new"](x), F.gelu(x, approximate="tanh"))


def test_untied_token_embeddings_are_not_counted_as_compute(tiny_config):
    tied = GPT(tiny_config)
    untied = GPT(GPTConfig(**(tiny_config.__dict__ | {"tie_embeddings": False})))
    wte = tied.transformer.wte.weight.numel()
    # the untied model has one more V x C matrix (lm_head), but its wte is a lookup: no FLOPs, not "non-embedding"
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + wte
    assert untied.num_params() == tied.num_params()
    assert untied.flops_per_token(16) == tied.flops_per_token(16)


def test_the_static_kv_cache_takes_keys_in_the_dtype_autocast_gives_them(tiny_config):
    """A float32 model decoding eagerly under bf16 autocast (as after a recompile-limit fallback) writes bf16 keys
    into its float32 cache: stored as the cache's dtype, as the growing-shape path does."""
    cache = KVCache(1, tiny_config, 8, "cpu", torch.float32)
    k = torch.randn(1, tiny_config.n_kv_head, 3, tiny_config.head_size).to(torch.bfloat16)
    keys, values = cache.update(torch.tensor(2), k, -k)
    assert keys.dtype == torch.float32 and torch.equal(keys[:, :, 2:5], k.float())
    assert torch.equal(values[:, :, 2:5], -k.float()) and not keys[:, :, :2].any()
