"""The architecture switches against things outside the code: every variant is causal, starts near ln(V) and
learns; grouped-query attention is multi-head attention with repeated key/value heads; RoPE scores depend only on
relative position and equal the complex rotation of RoFormer; the sinusoidal table and ALiBi slopes are the papers'
formulas; MoE output and load-balancing loss recomputed by hand; and the defaults are still exactly GPT-2."""

import math

import pytest
import torch
from torch.nn import functional as F

import model as gpt_model
from model import GPT, GPTConfig

BASE = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)

# One entry per switch value (and the combinations that matter): the defaults are GPT-2.
SWITCHES = {
    "gpt2_defaults": {},
    "sinusoidal": dict(pos_embedding="sinusoidal"),
    "rope": dict(pos_embedding="rope", rope_theta=500.0),
    "alibi": dict(pos_embedding="alibi"),
    "no_positions": dict(pos_embedding="none"),
    "rmsnorm": dict(norm="rmsnorm"),
    "post_layernorm": dict(norm_position="post"),
    "post_rmsnorm": dict(norm_position="post", norm="rmsnorm"),
    "gelu": dict(mlp="gelu"),
    "relu": dict(mlp="relu"),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "mlp_hidden": dict(mlp_hidden=48),
    "mqa": dict(n_kv_head=1),
    "gqa": dict(n_kv_head=2),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "no_bias": dict(bias=False),
    "moe": dict(n_expert=4, n_expert_active=2),
    "moe_top1": dict(n_expert=4, n_expert_active=1),
    "moe_shared": dict(n_expert=4, n_expert_active=2, moe_shared_expert=True),
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False),
    "alibi_mqa_qk_norm": dict(pos_embedding="alibi", n_kv_head=1, qk_norm=True),
    "rope_swiglu_moe": dict(pos_embedding="rope", mlp="swiglu", n_expert=4, n_expert_active=2, bias=False),
    "t5_positions": dict(pos_embedding="t5", rel_buckets=8, rel_max_distance=16),
    "geglu": dict(mlp="geglu"),
    "unscaled_attention": dict(attn_scale=False),
    "t5_layout_decoder": dict(pos_embedding="t5", norm="rmsnorm", mlp="geglu", attn_scale=False, bias=False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread is fastest, and immune to a busy machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(**overrides) -> GPTConfig:
    return GPTConfig(**(BASE | overrides))


def random_tokens(config: GPTConfig, batch: int, length: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, length or config.block_size), generator=g)


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random, norm gains around 1, so nothing is an identity or zero that hides a mistake."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = p.dim() == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_gain else std * torch.randn_like(p))
    return model


# --- every switch: shapes, causality, loss at init, learning --------------------------------------------------------


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_forward_shapes(switches):
    config = make_config(**switches)
    model = GPT(config).eval()
    for T in (config.block_size, 5):
        logits, loss = model(random_tokens(config, 3, T))
        assert logits.shape == (3, 1, config.vocab_size) and loss is None  # inference: the last position only
        logits, loss = model(random_tokens(config, 3, T), all_logits=True)
        assert logits.shape == (3, T, config.vocab_size)
        assert loss is None
    x, y = random_tokens(config, 2), random_tokens(config, 2, seed=1)
    logits, loss = model(x, y)
    assert logits.shape == (2, config.block_size, config.vocab_size)
    assert loss.shape == () and torch.isfinite(loss)
    hs, nkv = config.head_size, config.n_kv_head
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((config.n_head + 2 * nkv) * hs, config.n_embd)
    assert ("wpe" in model.transformer) == (config.pos_embedding == "learned")
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_causality(switches):
    # Changing token t must leave every logit before t exactly as it was, and change every position from t on.
    config = make_config(**switches)
    model = randomize_(GPT(config)).eval()  # random weights: attention far from uniform, MoE routing decisive
    t = 7
    idx = random_tokens(config, 2)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    with torch.no_grad():
        before, _ = model(idx, all_logits=True)
        after, _ = model(changed, all_logits=True)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    diff = (after - before).abs().amax(dim=(0, 2))  # (T,) largest change per position
    assert (diff[t:] > 1e-4).all(), diff


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_loss_at_init_is_near_ln_vocab(switches):
    # Small init -> nearly uniform predictions -> cross-entropy ~ ln(V) = 4.16 for V = 64, whatever the architecture.
    config = make_config(**switches)
    model = GPT(config).eval()
    losses = [model(random_tokens(config, 8, seed=s), random_tokens(config, 8, seed=100 + s))[1] for s in range(3)]
    assert abs(torch.stack(losses).mean().item() - math.log(config.vocab_size)) < 0.3


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_adamw_steps_on_a_fixed_batch_lower_the_loss(switches):
    config = make_config(**switches)
    model = GPT(config)
    x, y = random_tokens(config, 4), random_tokens(config, 4, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses  # from ~4.2 to well under 2 (memorising 64 random targets)


# --- blocks, norms, MLPs, QK-norm written out ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_is_the_residual_formula(norm_position, norm):
    # Pre-norm [1]: x + attn(ln_1(x)), then h + mlp(ln_2(h)). Post-norm [2] (Add & Norm): ln_1(x + attn(x)), then
    # ln_2(h + mlp(h)), and no final norm since every block already ends in one.
    model = randomize_(GPT(make_config(norm_position=norm_position, norm=norm))).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, BASE["block_size"], BASE["n_embd"])
    with torch.no_grad():
        if norm_position == "post":
            h = block.ln_1(x + block.attn(x))
            expected = block.ln_2(h + block.mlp(h))
        else:
            h = x + block.attn(block.ln_1(x))
            expected = h + block.mlp(block.ln_2(h))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-6)
    assert isinstance(model.transformer.ln_f, torch.nn.Identity) == (norm_position == "post")


def test_rmsnorm_is_x_over_root_mean_square_times_gain():
    # [5]: no mean subtraction, no bias.
    model = randomize_(GPT(make_config(norm="rmsnorm", bias=True)))
    ln = model.transformer.h[0].ln_1
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    x = torch.randn(3, 5, BASE["n_embd"]) + 2.0
    expected = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + model.config.norm_eps) * ln.weight
    torch.testing.assert_close(ln(x), expected)


@pytest.mark.parametrize("mlp", ["gelu_tanh", "gelu", "relu", "relu2", "swiglu", "geglu"])
def test_mlp_is_the_papers_formula(mlp):
    model = randomize_(GPT(make_config(mlp=mlp)))
    m = model.transformer.h[0].mlp
    x = torch.randn(2, 5, BASE["n_embd"])
    up = x @ m.c_fc.weight.T + m.c_fc.bias
    act = {
        "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),  # [1]
        "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
        "relu": lambda h: h.clamp(min=0),
        "relu2": lambda h: h.clamp(min=0) ** 2,  # [7]
    }
    if mlp == "swiglu":  # [6]: (Swish(x W_gate) * x W_up) W_down
        gate = x @ m.c_gate.weight.T + m.c_gate.bias
        hidden = gate * torch.sigmoid(gate) * up
    elif mlp == "geglu":  # [6], T5 v1.1: (GELU(x W_gate) * x W_up) W_down, GELU's tanh form
        hidden = act["gelu_tanh"](x @ m.c_gate.weight.T + m.c_gate.bias) * up
    else:
        hidden = act[mlp](up)
    expected = hidden @ m.c_proj.weight.T + m.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_queries_and_keys():
    # RMSNorm on each head's q and k: scaling the q and k projections changes nothing (up to norm_eps).
    model = randomize_(GPT(make_config(qk_norm=True, bias=False, n_kv_head=2))).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, BASE["block_size"], BASE["n_embd"])
    qk_rows = (BASE["n_head"] + 2) * BASE["n_embd"] // BASE["n_head"]  # query heads, then the 2 key heads
    with torch.no_grad():
        before = attn(x)
        attn.c_attn.weight[:qk_rows] *= 7.0
        after = attn(x)
        attn.c_attn.weight[qk_rows:] *= 7.0  # the values are not normalised: scaling them scales the output
        scaled_v = attn(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled_v, 7.0 * before, rtol=1e-4, atol=2e-4)


# --- grouped-query attention -----------------------------------------------------------------------------------------


def test_n_kv_head_defaults_to_n_head():
    assert make_config().n_kv_head == BASE["n_head"]
    a, b = make_config(), make_config(n_kv_head=BASE["n_head"])
    assert a == b


@pytest.mark.parametrize("pos_embedding", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_group(pos_embedding, n_kv_head):
    # [8]: query head h uses key/value head h // (n_head / n_kv_head). Build the multi-head model whose k and v
    # projections are the GQA ones repeated per group; it must compute the same function.
    gqa = randomize_(GPT(make_config(pos_embedding=pos_embedding, n_kv_head=n_kv_head))).eval()
    mha = GPT(make_config(pos_embedding=pos_embedding)).eval()
    nh, hs, group = BASE["n_head"], BASE["n_embd"] // BASE["n_head"], BASE["n_head"] // n_kv_head
    sd = gqa.state_dict()
    for key in [k for k in sd if "attn.c_attn" in k]:
        q, k, v = sd[key].split([nh * hs, n_kv_head * hs, n_kv_head * hs], dim=0)
        k, v = (t.unflatten(0, (n_kv_head, hs)).repeat_interleave(group, dim=0).flatten(0, 1) for t in (k, v))
        sd[key] = torch.cat([q, k, v], dim=0)  # (3 * nh * hs, ...) like a multi-head c_attn
    mha.load_state_dict(sd, strict=True)
    idx = random_tokens(gqa.config, 3)
    with torch.no_grad():
        expected, _ = mha(idx)
        logits, _ = gqa(idx)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


# --- positions --------------------------------------------------------------------------------------------------------


def rope_at(x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (hs,) rotated as if at position pos, through the model's own apply_rope."""
    return gpt_model.apply_rope(x.view(1, 1, 1, -1), cos[pos : pos + 1], sin[pos : pos + 1]).view(-1)


def test_rope_score_depends_only_on_relative_position():
    # [3]: <R_m q, R_n k> = <q, R_(n-m) k>, so shifting both positions by s leaves the score unchanged.
    hs, theta = 16, 10000.0
    cos, sin = gpt_model.rope_tables(40, hs, theta)
    g = torch.Generator().manual_seed(0)
    for m, n, s in [(5, 2, 7), (3, 3, 20), (0, 9, 11), (12, 1, 25)]:
        q, k = F.normalize(torch.randn(2, hs, generator=g), dim=-1)
        score = rope_at(q, m, cos, sin) @ rope_at(k, n, cos, sin)
        shifted = rope_at(q, m + s, cos, sin) @ rope_at(k, n + s, cos, sin)
        assert abs(score - shifted).item() < 1e-5, (m, n, s)
        moved = rope_at(q, m, cos, sin) @ rope_at(k, n + 1, cos, sin)
        assert abs(score - moved).item() > 1e-3  # and it does depend on the distance


def test_rope_is_the_complex_rotation_of_each_half_split_pair():
    # Half-split layout (Llama's weights): z_i = x_i + j x_(i + hs/2) is multiplied by exp(j p theta^(-2i/hs)).
    hs, theta, pos = 8, 500.0, 6
    cos, sin = gpt_model.rope_tables(16, hs, theta)
    x = torch.randn(hs, dtype=torch.float64)
    z = torch.complex(x[: hs // 2], x[hs // 2 :])
    angle = pos * theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    rotated = z * torch.exp(1j * angle)
    expected = torch.cat([rotated.real, rotated.imag]).float()
    torch.testing.assert_close(rope_at(x.float(), pos, cos, sin), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(rope_at(x.float(), 0, cos, sin), x.float())  # position 0 is the identity
    assert rope_at(x.float(), pos, cos, sin).norm().item() == pytest.approx(x.norm().item(), rel=1e-6)


def test_model_uses_rope_tables_of_its_config():
    model = GPT(make_config(pos_embedding="rope", rope_theta=500.0))
    cos, sin = gpt_model.rope_tables(BASE["block_size"], BASE["n_embd"] // BASE["n_head"], 500.0)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert "rope_cos" not in model.state_dict()  # recomputed from the config, never saved


def test_sinusoidal_table_is_vaswani_formula():
    # [2] section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
    block, d = 32, 16
    table = gpt_model.sinusoidal_table(block, d)
    assert table.shape == (block, d)
    for pos, i in [(0, 0), (1, 0), (5, 1), (17, 3), (31, 7), (9, 5)]:
        angle = pos / 10000 ** (2 * i / d)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    model = GPT(make_config(pos_embedding="sinusoidal"))
    # the model's copy is scaled to the token embeddings' init std (0.02 RMS), so it does not drown them
    table = gpt_model.sinusoidal_table(BASE["block_size"], BASE["n_embd"])
    torch.testing.assert_close(model.pos_table, table * 0.02 * math.sqrt(2))
    assert model.pos_table.square().mean().sqrt().item() == pytest.approx(0.02, rel=0.01)
    assert "pos_table" not in model.state_dict()


def test_alibi_slopes_are_the_geometric_sequence():
    # [4]: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    torch.testing.assert_close(gpt_model.alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    torch.testing.assert_close(gpt_model.alibi_slopes(4), torch.tensor([2.0**-i for i in (2, 4, 6, 8)]))
    # Not a power of 2 (the paper's reference code): the closest power of 2's slopes, then every other one of 2x's.
    torch.testing.assert_close(gpt_model.alibi_slopes(6), torch.tensor([2.0**-i for i in (2, 4, 6, 8, 1, 3)]))


@pytest.mark.parametrize("start", [0, 3])
def test_alibi_bias_is_minus_slope_times_distance_and_causal(start):
    # T queries at positions start..start+T-1 (start > 0 after a KV-cache prefill) against keys 0..start+T-1.
    slopes = gpt_model.alibi_slopes(8)
    T = 5
    bias = gpt_model.alibi_bias(slopes, start + torch.arange(T), start + T)
    assert bias.shape == (8, T, start + T)
    for h in (0, 3, 7):
        for i in range(T):
            for j in range(start + T):
                if j > start + i:
                    assert bias[h, i, j].item() == float("-inf")
                else:
                    assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (start + i - j))


@pytest.mark.parametrize("pos_embedding", ["rope", "sinusoidal", "learned", "alibi"])
def test_crop_block_size(pos_embedding):
    model = GPT(make_config(pos_embedding=pos_embedding, block_size=32)).eval()
    idx = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        before, _ = model(idx, all_logits=True)
        model.crop_block_size(12)
        after, _ = model(idx, all_logits=True)
    assert model.config.block_size == 12
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for name in ("pos_table", "rope_cos", "rope_sin"):
        if hasattr(model, name):
            assert getattr(model, name).shape[0] == 12
            assert name in dict(model.named_buffers())  # still a buffer, so .to(device) moves it
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(model.config, 1, 13))
    with pytest.raises(ValueError, match="grow"):
        model.crop_block_size(20)


# --- Mixture of Experts ----------------------------------------------------------------------------------------------


def moe_layer(shared: bool = False, k: int = 2):
    """The first MoE layer of a tiny model, with random weights: a decisive router and experts that differ."""
    model = GPT(make_config(n_expert=4, n_expert_active=k, moe_shared_expert=shared))
    moe = model.transformer.h[0].mlp
    assert isinstance(moe, gpt_model.MoE)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def routing_by_hand(moe, flat: torch.Tensor, k: int):
    """Router probabilities (N, E) and, per token, its k most likely experts and their renormalised weights."""
    probs = torch.softmax(flat @ moe.router.weight.T, dim=-1)
    chosen = probs.argsort(dim=-1, descending=True)[:, :k]  # (N, k)
    top = probs.gather(1, chosen)
    return probs, chosen, top / top.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("shared", [False, True])
def test_moe_output_is_weighted_sum_of_each_tokens_top_k_experts(shared):
    k = 2
    moe = moe_layer(shared=shared, k=k).eval()
    x = torch.randn(2, 8, BASE["n_embd"])
    flat = x.reshape(-1, BASE["n_embd"])
    seen = {}
    hooks = [
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.__setitem__(e, inp[0].clone()))
        for e, expert in enumerate(moe.experts)
    ]
    with torch.no_grad():
        out = moe(x).reshape(flat.shape)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        probs, chosen, weights = routing_by_hand(moe, flat, k)
        expected = torch.zeros_like(flat)
        for n in range(flat.size(0)):
            for j in range(k):
                expected[n] += weights[n, j] * moe.experts[chosen[n, j]](flat[n : n + 1])[0]
            if shared:
                expected[n] += moe.shared(flat[n : n + 1])[0]
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # Each expert saw exactly the tokens that chose it, and no other (an expert no token chose runs on none).
    for e in range(len(moe.experts)):
        tokens = (chosen == e).any(dim=1).nonzero().flatten()
        torch.testing.assert_close(seen[e], flat[tokens], rtol=0, atol=0)
    assert sum(v.size(0) for v in seen.values()) == flat.size(0) * k


def test_under_cpu_autocast_each_experts_rows_are_padded_to_a_multiple_of_64_at_weight_0():
    """CPUs' bf16 matmuls build a kernel for every new shape: padded, an expert's shapes repeat from step to step.
    The padding is zero rows at weight 0: output and gradients are those of each expert on its own tokens alone."""
    moe = moe_layer(shared=False, k=2)
    x = torch.randn(2, 8, BASE["n_embd"])
    flat = x.reshape(-1, BASE["n_embd"])
    seen = {}
    hooks = [
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.__setitem__(e, inp[0].detach().clone()))
        for e, expert in enumerate(moe.experts)
    ]
    results = []
    for by_hand in (False, True):
        xx = x.clone().requires_grad_()
        _, chosen, weights = routing_by_hand(moe, xx.reshape(flat.shape), 2)  # in float32, as the layer routes
        with torch.autocast("cpu", torch.bfloat16):
            if by_hand:  # each expert on exactly its tokens, weighted as the layer weights them
                out = torch.zeros_like(flat)
                for e, expert in enumerate(moe.experts):
                    token, slot = torch.where(chosen == e)
                    out.index_add_(0, token, expert(xx.reshape(flat.shape)[token]) * weights[token, slot, None])
            else:
                out = moe(xx).reshape(flat.shape)
                for h in hooks:
                    h.remove()
        out.float().pow(2).sum().backward()
        results.append((out.detach(), xx.grad))
    for e, rows in seen.items():
        n = (chosen == e).any(dim=1).sum().item()
        assert rows.size(0) == -(-n // 64) * 64 and not rows[n:].any()  # then zero rows up to a multiple of 64
    (padded, padded_grad), (alone, alone_grad) = results
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_grad, alone_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_aux_loss_is_switch_transformer_formula(k):
    # [9]: E * sum_e f_e P_e, f_e the share of routing slots sent to expert e, P_e its mean router probability.
    moe = moe_layer(k=k)
    x = torch.randn(3, 8, BASE["n_embd"])
    flat = x.reshape(-1, BASE["n_embd"])
    with torch.no_grad():
        moe(x)
        probs, chosen, _ = routing_by_hand(moe, flat, k)
    E = len(moe.experts)
    f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / chosen.numel()
    expected = E * (f * probs.mean(dim=0)).sum()
    assert torch.isfinite(moe.aux_loss)
    torch.testing.assert_close(moe.aux_loss, expected, rtol=1e-5, atol=1e-6)


def test_moe_aux_loss_is_one_with_uniform_router():
    # Uniform probabilities: P_e = 1/E, so E * sum_e f_e / E = sum_e f_e = 1 however ties are broken.
    moe = moe_layer()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe(torch.randn(2, 8, BASE["n_embd"]))
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_training_the_router_on_the_aux_loss_alone_balances_it():
    moe = moe_layer()
    x = torch.randn(4, 8, BASE["n_embd"]).abs() + 0.5  # positive features ...
    with torch.no_grad():
        moe.router.weight[0] = 0.3  # ... so expert 0 wins every token: f_0 = 1/2 (one of 2 slots), P_0 ~ 1
    opt = torch.optim.Adam([moe.router.weight], lr=0.02)
    losses = []
    for _ in range(60):
        moe(x)
        losses.append(moe.aux_loss.item())
        opt.zero_grad(set_to_none=True)
        moe.aux_loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(2.0, abs=0.01)  # E * f_0 * P_0 = 4 * 1/2 * 1
    assert sum(losses[-10:]) / 10 < 1.15, losses  # near balanced (1.0)


def test_gpt_loss_is_cross_entropy_plus_coef_times_mean_aux_loss():
    config = make_config(n_expert=4, n_expert_active=2, moe_aux_loss_coef=0.5)
    model = randomize_(GPT(config))
    x, y = random_tokens(config, 3), random_tokens(config, 3, seed=1)
    logits, loss = model(x, y)
    per_layer = [block.mlp.aux_loss for block in model.transformer.h]
    aux = torch.stack(per_layer).mean()
    torch.testing.assert_close(model.moe_aux_loss(), aux)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert aux.item() > 0.5
    torch.testing.assert_close(loss, ce + 0.5 * aux, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert model.transformer.h[0].mlp.router.weight.grad.abs().sum() > 0  # the router learns


def test_no_aux_loss_without_moe():
    model = GPT(make_config())
    x, y = random_tokens(model.config, 2), random_tokens(model.config, 2, seed=1)
    logits, loss = model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert model.moe_aux_loss().item() == 0.0


# --- the defaults are GPT-2 ------------------------------------------------------------------------------------------


def gpt2_state_dict_names(n_layer: int) -> set[str]:
    """GPT-2's parameter names (transformers' GPT2LMHeadModel, without its causal-mask buffers)."""
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    names.add("lm_head.weight")
    for i in range(n_layer):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names |= {f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"}
    return names


def test_defaults_are_gpt2_124m_names_and_parameter_count():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, bias=True)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(config)
    assert set(model.state_dict()) == gpt2_state_dict_names(12)
    modules = dict(model.named_modules())
    for name in ("transformer.wte", "transformer.wpe", "transformer.h.11.attn.c_attn", "transformer.ln_f", "lm_head"):
        assert name in modules
    assert isinstance(modules["transformer.h.0.mlp"], gpt_model.MLP)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 768, 768)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * 768, 768)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, as transformers counts it
    assert model.num_params() == 124_439_808 - 1024 * 768
    assert dict(model.named_buffers()) == {}


def test_default_switches_are_gpt2():
    c = GPTConfig()
    assert (c.pos_embedding, c.norm, c.norm_position, c.mlp) == ("learned", "layernorm", "pre", "gelu_tanh")
    assert (c.n_kv_head, c.mlp_hidden, c.qk_norm, c.tie_embeddings, c.n_expert) == (12, 4 * 768, False, True, 0)


def test_swiglu_hidden_size_is_two_thirds_of_4c_rounded_up_to_64():
    assert GPTConfig(mlp="swiglu", n_embd=768).mlp_hidden == 2048  # 8/3 * 768 = 2048
    assert GPTConfig(mlp="swiglu", n_embd=64, n_head=4).mlp_hidden == 192  # 170.7 -> 192
    assert GPTConfig(mlp="swiglu", n_embd=64, n_head=4, mlp_hidden=100).mlp_hidden == 100


# --- validation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pos_embedding="xpos"), "pos_embedding"),
        (dict(norm="batchnorm"), "norm"),
        (dict(norm_position="sandwich"), "norm_position"),
        (dict(mlp="reglu"), "mlp"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_head=4, n_kv_head=0), "n_kv_head"),
        (dict(n_head=4, n_kv_head=8), "n_kv_head"),
        (dict(n_embd=12, n_head=4, pos_embedding="rope"), "even"),
        (dict(n_expert=2, n_expert_active=3), "n_expert_active"),
        (dict(n_expert=4, n_expert_active=0), "n_expert_active"),
        (dict(n_expert=-1), "n_expert"),
    ],
)
def test_gpt_config_rejects_bad_switches(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(**kwargs)


def test_odd_head_size_is_fine_without_rope():
    GPT(make_config(n_embd=12, n_head=4))  # head size 3


@pytest.mark.slow
def test_every_position_scheme_trains_about_as_well_as_learned(char_data, tmp_path):
    """150 steps of a tiny model on characters: the unscaled sinusoidal table (RMS 0.71 against token embeddings of
    std 0.02) ended at val 3.35 where learned positions reach 2.40; every scheme must land within 0.1 of learned."""
    import json

    import train

    val = {}
    for pos in ("learned", "sinusoidal", "rope", "alibi", "none"):
        out = tmp_path / pos
        shape = "--n_layer=2 --n_head=2 --n_embd=64 --block_size=32 --batch_size=16 --gradient_accumulation_steps=1"
        schedule = "--max_iters=150 --eval_interval=150 --eval_iters=10 --learning_rate=3e-3 --min_lr=3e-4"
        data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}"]
        train.main([*data, "--device=cpu", "--compile=False", *shape.split(), *schedule.split(), "--warmup_iters=10",
                    "--dropout=0", f"--pos_embedding={pos}"])  # fmt: skip
        with open(out / "metrics.jsonl") as f:
            val[pos] = [json.loads(line) for line in f][-1]["val_loss"]
    assert all(loss < val["learned"] + 0.1 for loss in val.values()), val
