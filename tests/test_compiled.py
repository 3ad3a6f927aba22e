"""The paths a GPU user runs, exercised on CPU: torch.compile (inductor) under bfloat16. Dynamo's counters show
graphs, recompiles and graph breaks here exactly as on CUDA, so these pin what a GPU run will do: compiled decoding
in two graphs whatever the length, reused across calls, equal to eager; sample.py compiled in bf16; a compiled bf16
training step without graph breaks."""

import dataclasses

import pytest
import torch
from test_classify import prepare_labelled
from test_generate import GREEDY, samples
from torch._dynamo.utils import counters

import sample
import train
from engine.checkpoint import save_checkpoint
from engine.generate import Decoder, transduce
from engine.runtime import trace_data_dependent_shapes
from model import GPT, GPTConfig

pytestmark = pytest.mark.slow


def trained_like(config: GPTConfig) -> GPT:
    """A model trained to continue t -> (t + 5) mod 29 (ids below the 29 characters of the char test vocabulary),
    so its greedy choices have wide margins: with random weights they are near-ties that any change in bf16
    rounding (a fused kernel, a masked instead of a sliced cache) flips."""
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    T = config.block_size
    for _ in range(60):
        start = torch.randint(0, 29, (8, 1))
        seq = (start + 5 * torch.arange(T + 1)) % 29  # (8, T + 1)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return model.eval()


def bf16_model(**switches) -> GPT:
    config = GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **switches)
    return trained_like(config).to(torch.bfloat16)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    # as a fresh process has it, whatever an earlier test's train.main set; restored afterwards
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("switches", [{}, {"pos_embedding": "rope", "n_kv_head": 1}])
def test_compiled_bf16_decoding_is_two_graphs_reused_and_equals_eager(switches, fresh_dynamo):
    model = bf16_model(**switches)
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(1))
    eager = torch.cat(list(Decoder(model).generate(prompt, 60, GREEDY)), dim=1)
    decoder = Decoder(model, compile=True)
    compiled = torch.cat(list(decoder.generate(prompt, 60, GREEDY)), dim=1)
    assert torch.equal(compiled, eager)
    # prefill + one decoding step, whatever the length; the growing sequence's strides used to recompile per token
    assert fresh_dynamo["stats"]["unique_graphs"] == 2
    assert not fresh_dynamo["graph_break"]
    cache = decoder.cache
    again = torch.cat(list(decoder.generate(prompt, 60, GREEDY)), dim=1)
    assert torch.equal(again, eager)
    assert decoder.cache is cache and fresh_dynamo["stats"]["unique_graphs"] == 2  # same buffers, same graphs
    assert cache[0].k.dtype == torch.bfloat16  # the cache takes the model's dtype


# bf16 weights at batch 2 past block_size: test_sample_cli_compiled_in_bf16_equals_eager; a float32 cache under bf16
# autocast: test_model.py's test_the_static_kv_cache_takes_keys_in_the_dtype_autocast_gives_them
@pytest.mark.parametrize(("precision", "batch"), [("bf16 weights", 1), ("bf16 autocast", 2)])
def test_compiled_decoding_far_past_block_size_stays_three_graphs(batch, precision, fresh_dynamo):
    """Char models sample far past their context (nanoGPT: 500 new tokens on block_size 256), re-prefilling the last
    block_size tokens at every step. That window is a slice of the growing sequence, whose row stride grows by one
    per token; at batch 1 .contiguous() kept it (a size-1 dimension counts as contiguous whatever its stride), so
    each token recompiled until Dynamo's limit (8 graphs) and the rest ran eagerly."""
    model = trained_like(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    if precision == "bf16 weights":  # what sample.py does
        model = model.to(torch.bfloat16)
    prompt = torch.randint(0, 29, (batch, 3), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
        eager = torch.cat(list(Decoder(model).generate(prompt, 61, GREEDY)), dim=1)  # 64 tokens: 4x block_size
        decoder = Decoder(model, compile=True)
        compiled = torch.cat(list(decoder.generate(prompt, 61, GREEDY)), dim=1)
        assert torch.equal(compiled, eager)
        # prefill of the prompt, one-token step, re-prefill of the last block_size tokens: nothing per token
        assert fresh_dynamo["stats"]["unique_graphs"] == 3, dict(fresh_dynamo["stats"])
        cache = decoder.cache  # sliding the window re-prefills this cache in place, never a new one
        again = torch.cat(list(decoder.generate(prompt, 61, GREEDY)), dim=1)
    assert torch.equal(again, eager) and decoder.cache is cache and fresh_dynamo["stats"]["unique_graphs"] == 3
    assert not fresh_dynamo["graph_break"]


def test_compiled_greedy_decoding_picks_each_token_inside_the_step(monkeypatch, fresh_dynamo):
    """No eager sampling code runs after the compiled forward: the argmax is in its graph (and, on CUDA, in the
    captured CUDA graph), and the tokens still equal eager decoding's."""
    from engine import generate as generation

    model = bf16_model()
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(1))
    eager = torch.cat(list(Decoder(model).generate(prompt, 20, GREEDY, vocab_size=29)), dim=1)
    decoder = Decoder(model, compile=True)
    first = torch.cat(list(decoder.generate(prompt, 20, GREEDY, vocab_size=29)), dim=1)  # compiles both graphs
    monkeypatch.setattr(generation, "next_token", lambda *a, **k: pytest.fail("sampled outside the compiled step"))
    monkeypatch.setattr(torch.Tensor, "argmax", lambda *a, **k: pytest.fail("an eager argmax after the graph"))
    again = torch.cat(list(decoder.generate(prompt, 20, GREEDY, vocab_size=29)), dim=1)
    assert torch.equal(first, eager) and torch.equal(again, eager) and int(eager.max()) < 29
    assert fresh_dynamo["stats"]["unique_graphs"] == 2


def test_sample_cli_compiled_in_bf16_equals_eager(tmp_path, capsys, fresh_dynamo):
    chars = "\n !abcdefghijklmnopqrstuvwxyz"
    model = trained_like(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    data = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars), "eot_id": None}
    meta = {"model_config": model.config.__dict__, "train_config": {}, "data": data}
    save_checkpoint(str(tmp_path), 1, model, {}, meta)
    base = [f"--out_dir={tmp_path}", "--device=cpu", "--dtype=bfloat16", "--max_new_tokens=40", "--start=ab"]
    base += ["--num_samples=2", "--temperature=0"]
    sample.main(base)
    eager = samples(capsys)
    sample.main([*base, "--compile=True"])  # crashed: bf16 keys into a float32 static cache
    assert samples(capsys) == eager and len(eager) == 2
    assert all(set(s) <= set(chars) for s in eager)  # ids 29..63 (the padded vocabulary) are never sampled
    # prefill, decode, and the re-prefill of the last block_size tokens once the 42 tokens outgrow block_size 32
    assert fresh_dynamo["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize(
    "switches",
    [
        [],
        ["--n_expert=4", "--n_expert_active=1"],
        ["--arch=encoder"],
        ["--arch=encoder", "--dataset=labelled"],
        ["--arch=encoder_decoder", "--dataset=reverse", "--pos_embedding=t5", "--mlp=geglu", "--attn_scale=False"],
    ],
    ids=["dense", "moe", "encoder", "classifier", "encoder_decoder"],
)
def test_compiled_bf16_training_step_has_no_graph_breaks(switches, char_data, tmp_path, fresh_dynamo):
    if "--dataset=labelled" in switches:  # a classifier: padded rows, its padding mask made from the ids
        prepare_labelled(char_data, tmp_path)
    if "--dataset=reverse" in switches:  # an encoder-decoder: pairs, T5's bias in both stacks, cross-attention
        import reverse

        reverse.main([f"--out={char_data}/reverse", "--n_train=100", "--n_val=10"])
    argv = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    argv += ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=1"]
    argv += switches  # MoE: its routing's torch.where is traced with symbolic sizes, not a break and recompiles
    argv += ["--gradient_accumulation_steps=2", "--max_iters=3", "--eval_interval=3", "--compile=True"]
    argv += ["--dtype=bfloat16", "--warmup_iters=1"]
    assert train.main(argv) == 0
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    # one graph for training and one for evaluation (eval mode): nothing recompiles per step
    assert fresh_dynamo["stats"]["unique_graphs"] <= 2, dict(fresh_dynamo["stats"])


def test_compiled_moe_routes_in_one_graph_and_equals_eager(fresh_dynamo):
    trace_data_dependent_shapes()  # what train.py sets when it compiles
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, n_expert_active=2)
    model = GPT(dataclasses.replace(config, moe_shared_expert=True))
    compiled = torch.compile(model)
    loads = set()
    for seed in range(3):  # each batch sends a different number of tokens to each expert
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randint(64, (4, 16), generator=g), torch.randint(64, (4, 16), generator=g)
        with torch.no_grad():
            h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(16))
            router = model.transformer.h[0].mlp.router
            loads.add(
                tuple(
                    torch.bincount(
                        router(model.transformer.h[0].ln_2(h)).topk(2).indices.flatten(), minlength=4
                    ).tolist()
                )
            )
        results = []
        for forward in (model, compiled):
            model.zero_grad()
            _, loss = forward(x, y)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(loads) > 1, loads  # the token counts per expert did change between calls
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert fresh_dynamo["stats"]["unique_graphs"] == 1, dict(fresh_dynamo["stats"])


def test_compiled_bf16_seq2seq_decoding_is_one_graph_and_equals_eager(fresh_dynamo):
    """An encoder-decoder's steps after the first (which fills the cross-attention cache) run through one compiled
    graph with static shapes, whatever the length, and choose the eager path's tokens."""
    config = GPTConfig(
        arch="encoder_decoder", block_size=24, vocab_size=40, n_layer=2, n_head=4, n_embd=32, bias=False,
        pos_embedding="t5", attn_scale=False, norm="rmsnorm", mlp="geglu", tie_embeddings=False, pad_id=0,
        rel_buckets=8, rel_max_distance=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than the init, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4) if p.dim() > 1 else None
    source = torch.randint(2, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    source[1, 7:] = 0  # a padded source
    eager = torch.cat(list(transduce(model, source, 20, GREEDY, end=-1)), dim=1)
    compiled = torch.cat(list(transduce(model, source, 20, GREEDY, end=-1, compile=True)), dim=1)
    assert torch.equal(compiled, eager) and compiled.shape == (3, 20)  # float32: the same tokens
    torch._dynamo.reset()
    fresh_dynamo.clear()
    model = model.to(torch.bfloat16)  # bf16 (inductor's fusions round otherwise than eager: near-ties may differ)
    compiled = torch.cat(list(transduce(model, source, 20, GREEDY, end=-1, compile=True)), dim=1)
    assert compiled.shape == (3, 20) and (compiled == eager).float().mean() > 0.5
    assert not fresh_dynamo["graph_break"] and fresh_dynamo["stats"]["unique_graphs"] == 1
