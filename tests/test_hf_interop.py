"""Hugging Face interop against transformers itself: Llama checkpoints load into GPT with the same logits and greedy
tokens; GPT exported by save_hf (and by tools/export_hf.py from a checkpoint) loads in AutoModelForCausalLM as
LlamaForCausalLM or GPT2LMHeadModel with the same logits and greedy tokens; round trips keep every weight;
architectures neither layout can hold are refused."""

import dataclasses
import os

import pytest
import torch

import train
from engine import hf_interop
from engine.checkpoint import find_checkpoint, load_weights, read_meta, save_checkpoint
from engine.errors import UserError
from engine.generate import Sampling, extend
from engine.hf_interop import UnsupportedModel, from_pretrained
from model import GPT, GPTConfig
from tools import export_hf

transformers = pytest.importorskip("transformers", reason="transformers is needed for the Hugging Face parity tests")

VOCAB, BLOCK, PROMPT_LEN, NEW_TOKENS = 100, 32, 6, 20


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread is fastest, and immune to a busy machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor random: norm gains around 1, everything else around 0, so a mis-mapped weight shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name)
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_gain else 0.1 * torch.randn_like(p))
    return model


def prompts(seed: int = 1) -> torch.Tensor:
    # Tokens 1..99 only: HF's generate treats the pad token (0 here) in a prompt as left padding.
    return torch.randint(1, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: GPT, hf, seed: int = 0):
    idx = torch.randint(VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx, all_logits=True)
    assert expected.abs().max() > 1.0  # not a comparison between two near-zero tensors
    assert (logits - expected).abs().max().item() < 1e-4


def assert_same_greedy(ours: GPT, hf):
    idx = prompts()
    hf.generation_config.eos_token_id = None  # our generate never stops early; compare the tokens only
    hf.generation_config.bos_token_id = None
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0
    )
    out = extend(ours, idx, NEW_TOKENS, Sampling(temperature=0))
    assert out.shape == expected.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(out, expected)
    assert len(set(out[:, PROMPT_LEN:].flatten().tolist())) > 1  # the continuation is not one repeated token


def load_auto(directory: str):
    """AutoModelForCausalLM from directory, asserting every weight in the file was used and none was missing."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def hf_llama(n_kv_head: int, tied: bool, bias: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=BLOCK,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,  # no early stop in HF's generate
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return randomize_(transformers.LlamaForCausalLM(config)).eval()


def hf_gpt2(tied: bool = True):
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=BLOCK,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    return randomize_(transformers.GPT2LMHeadModel(config)).eval()


def tiny_config(**switches) -> GPTConfig:
    return GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, **switches)


LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)


# --- Llama import -----------------------------------------------------------------------------------------------------

LLAMA_CASES = {
    "gqa_untied": (2, False, False),
    "gqa_tied": (2, True, False),
    "mqa_untied": (1, False, False),
    "mqa_tied": (1, True, False),
    "mha_untied": (4, False, False),
    "mha_tied": (4, True, False),
    "gqa_bias": (2, False, True),
}


@pytest.fixture(scope="module", params=LLAMA_CASES.values(), ids=LLAMA_CASES.keys())
def saved_llama(request, tmp_path_factory):
    """A small random LlamaForCausalLM saved with save_pretrained (config.json + model.safetensors)."""
    n_kv_head, tied, bias = request.param
    hf = hf_llama(n_kv_head, tied, bias)
    directory = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(directory)
    return hf, str(directory), request.param


def test_llama_import_config(saved_llama):
    _, directory, (n_kv_head, tied, bias) = saved_llama
    config = from_pretrained(directory).config
    assert (config.pos_embedding, config.norm, config.mlp, config.norm_position) == ("rope", "rmsnorm", "swiglu", "pre")
    assert (config.n_head, config.n_kv_head, config.n_embd, config.mlp_hidden) == (4, n_kv_head, 64, 96)
    assert (config.tie_embeddings, config.bias, config.rope_theta, config.norm_eps) == (tied, bias, 500.0, 1e-6)
    assert (config.block_size, config.vocab_size, config.n_layer) == (BLOCK, VOCAB, 2)


def test_llama_import_logits_match_transformers(saved_llama):
    hf, directory, _ = saved_llama
    ours = from_pretrained(directory).eval()
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == hf.config.tie_word_embeddings
    assert_same_logits(ours, hf)


def test_llama_import_greedy_matches_transformers_generate(saved_llama):
    hf, directory, _ = saved_llama
    assert_same_greedy(from_pretrained(directory).eval(), hf)


# --- Llama export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches",
    [
        dict(n_kv_head=2, tie_embeddings=False),
        dict(n_kv_head=2, tie_embeddings=True),
        dict(n_kv_head=1, tie_embeddings=False, rope_theta=500.0),
        dict(n_kv_head=4, tie_embeddings=False, bias=True, mlp_hidden=96),
    ],
    ids=["gqa_untied", "gqa_tied", "mqa_theta500", "mha_bias"],
)
def test_llama_export_loads_in_transformers_with_same_logits_and_greedy(switches, tmp_path):
    ours = randomize_(GPT(tiny_config(**(LLAMA | switches)))).eval()
    assert hf_interop.save_hf(ours, str(tmp_path)) == "llama"
    hf = load_auto(str(tmp_path))
    assert type(hf).__name__ == "LlamaForCausalLM"
    c = ours.config
    assert hf.config.num_key_value_heads == c.n_kv_head and hf.config.rms_norm_eps == c.norm_eps
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == c.tie_embeddings
    assert_same_logits(ours, hf)
    assert_same_greedy(ours, hf)


def test_llama_export_sets_no_bos_or_eos_token(tmp_path):
    # save_hf does not know the tokenizer. transformers' LlamaConfig defaults bos_token_id=1 and eos_token_id=2, so a
    # config.json that leaves them out makes HF's generate stop whenever the model emits token 2 (an ordinary
    # character of a char-level model) while our generate runs on: the export must write them explicitly (None).
    ours = GPT(tiny_config(**LLAMA, n_kv_head=2))
    hf_interop.save_hf(ours, str(tmp_path))
    hf = load_auto(str(tmp_path))
    assert hf.config.eos_token_id is None and hf.generation_config.eos_token_id is None
    assert hf.config.bos_token_id is None and hf.generation_config.bos_token_id is None


# --- GPT-2 export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(tie_embeddings=False),
        dict(mlp="gelu", mlp_hidden=96),
        dict(mlp="relu", tie_embeddings=False),
        dict(bias=False),  # GPT-2's layout always has biases: zeros compute the same function
    ],
    ids=["default_tied", "untied", "gelu_hidden96", "relu_untied", "no_bias"],
)
def test_gpt2_export_loads_in_transformers_with_same_logits_and_greedy(switches, tmp_path):
    ours = randomize_(GPT(tiny_config(**switches))).eval()
    assert hf_interop.save_hf(ours, str(tmp_path)) == "gpt2"
    hf = load_auto(str(tmp_path))
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == ours.config.tie_embeddings
    assert_same_logits(ours, hf)
    assert_same_greedy(ours, hf)


# --- round trips: Hugging Face -> ours -> Hugging Face ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_hf",
    [
        lambda: hf_gpt2(tied=True),
        lambda: hf_gpt2(tied=False),
        lambda: hf_llama(2, tied=False),
        lambda: hf_llama(1, tied=True, bias=True),
    ],
    ids=["gpt2_tied", "gpt2_untied", "llama_gqa", "llama_mqa_tied_bias"],
)
def test_round_trip_keeps_every_weight_and_the_logits(make_hf, tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path / "original")
    ours = from_pretrained(str(tmp_path / "original")).eval()
    hf_interop.save_hf(ours, str(tmp_path / "again"))
    again = load_auto(str(tmp_path / "again"))
    assert type(again) is type(hf)
    original_sd, again_sd = hf.state_dict(), again.state_dict()
    assert set(again_sd) == set(original_sd)
    for key, value in original_sd.items():
        assert torch.equal(again_sd[key], value), key
    assert_same_logits(ours, again)
    idx = prompts(2)
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, rtol=0, atol=0)


# --- refused architectures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches",
    [
        dict(pos_embedding="alibi"),
        dict(pos_embedding="sinusoidal"),
        dict(pos_embedding="none"),
        dict(norm_position="post"),
        dict(qk_norm=True),
        dict(n_expert=4, n_expert_active=2),
        dict(**LLAMA, norm_position="post"),
        dict(**LLAMA, qk_norm=True),
        dict(**LLAMA, n_expert=4, n_expert_active=2),
        dict(pos_embedding="rope", norm="layernorm", mlp="swiglu"),  # neither: Llama needs RMSNorm
        dict(mlp="relu2"),  # GPT-2 has no squared ReLU
        dict(n_kv_head=2),  # GPT-2 is multi-head only
    ],
    ids=[
        "alibi",
        "sinusoidal",
        "no_positions",
        "post_norm",
        "qk_norm",
        "moe",
        "llama_post_norm",
        "llama_qk_norm",
        "llama_moe",
        "rope_layernorm",
        "relu2",
        "gpt2_gqa",
    ],
)
def test_save_hf_refuses_what_neither_layout_holds(switches, tmp_path):
    model = GPT(tiny_config(**switches))
    with pytest.raises(hf_interop.UnsupportedModel):
        hf_interop.save_hf(model, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")  # refused before writing anything


# --- tools/export_hf.py -----------------------------------------------------------------------------------------------


def write_checkpoint(out_dir: str, model: GPT) -> str:
    """A checkpoint as train.py writes it, for a model over a 100-character vocabulary."""
    data = {"tokenizer": "char", "vocab_size": VOCAB, "dtype": "uint16", "eot_id": None, "chars": "x" * VOCAB}
    meta = {"model_config": dataclasses.asdict(model.config), "train_config": {}, "data": data, "val_loss": 1.0}
    state = {"optimizer": {}, "scaler": {}, "iter_num": 5, "best_val_loss": 1.0}
    return save_checkpoint(out_dir, 5, model, state, meta)


def test_export_hf_cli_writes_a_llama_transformers_loads(tmp_path, capsys):
    ours = randomize_(GPT(tiny_config(**LLAMA, n_kv_head=1, tie_embeddings=False))).eval()
    write_checkpoint(str(tmp_path / "out"), ours)
    export_hf.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    assert "llama layout" in capsys.readouterr().out
    with pytest.raises(UserError, match="not empty"):  # a second export never silently overwrites the first
        export_hf.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    export_hf.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}", "--overwrite=True"])
    hf = load_auto(str(tmp_path / "hf"))
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 1
    assert_same_logits(ours, hf)
    assert_same_greedy(ours, hf)


def test_train_then_export_a_llama_style_model(char_data, tmp_path, capsys):
    # End to end: train.py with the Llama switches, tools/export_hf.py, then transformers on the exported directory.
    out, hf_dir = str(tmp_path / "out"), str(tmp_path / "hf")
    train.main(
        [
            f"--data_root={char_data}",
            "--dataset=tiny_char",
            f"--out_dir={out}",
            "--device=cpu",
            "--compile=False",
            "--n_layer=2",
            "--n_head=2",
            "--n_embd=32",
            "--block_size=16",
            "--batch_size=4",
            "--gradient_accumulation_steps=1",
            "--eval_iters=1",
            "--max_iters=4",
            "--eval_interval=4",
            "--pos_embedding=rope",
            "--norm=rmsnorm",
            "--mlp=swiglu",
            "--n_kv_head=1",
            "--tie_embeddings=False",
        ]
    )
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"])
    assert "llama layout" in capsys.readouterr().out
    path = find_checkpoint(out)
    ours = GPT(GPTConfig(**read_meta(path)["model_config"])).eval()
    load_weights(path, ours)
    hf = load_auto(hf_dir)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 1
    assert not hf.config.tie_word_embeddings
    idx = torch.randint(ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx, all_logits=True)
    assert (logits - expected).abs().max().item() < 1e-4


def test_export_hf_cli_writes_a_gpt2_transformers_loads(tmp_path, capsys):
    ours = randomize_(GPT(tiny_config())).eval()
    path = write_checkpoint(str(tmp_path / "out"), ours)
    export_hf.main([f"--out_dir={path}", f"--hf_dir={tmp_path / 'hf'}"])  # a checkpoint directory works too
    assert "gpt2 layout" in capsys.readouterr().out
    hf = load_auto(str(tmp_path / "hf"))
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_same_logits(ours, hf)


def test_export_hf_cli_refuses_moe_with_a_user_error(tmp_path):
    write_checkpoint(str(tmp_path / "out"), GPT(tiny_config(**LLAMA, n_expert=4, n_expert_active=2)))
    with pytest.raises(UserError, match="cannot export.*Mixture of Experts"):
        export_hf.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize(
    "flags, accepted",
    [
        ({"scale_attn_weights": False}, False),
        ({"scale_attn_by_inverse_layer_idx": True}, False),
        ({"reorder_and_upcast_attn": True}, True),  # the same function, computed in float32
    ],
)
def test_gpt2_attention_variants_load_exactly_or_are_refused(flags, accepted, tmp_path):
    hf = hf_gpt2()
    for key, value in flags.items():
        setattr(hf.config, key, value)
    hf = transformers.GPT2LMHeadModel(hf.config).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    if not accepted:  # they load without complaint but compute another function: refused in one line
        with pytest.raises(UnsupportedModel, match=next(iter(flags))):
            from_pretrained(str(tmp_path))
        return
    assert_same_logits(from_pretrained(str(tmp_path)).eval(), hf)


def test_a_refused_export_names_only_the_rules_it_breaks():
    from engine.hf_interop import UnsupportedModel, hf_format

    with pytest.raises(UnsupportedModel) as e:
        hf_format(GPTConfig(n_layer=1, n_head=2, n_embd=16, pos_embedding="alibi"))
    message = str(e.value)
    assert "GPT-2 would need pos_embedding=learned (this model: alibi);" in message
    assert "Llama would need pos_embedding=rope (this model: alibi), norm=rmsnorm" in message
    assert "qk_norm" not in message and "norm_position" not in message


# --- exports carry their tokenizer: transformers.pipeline generates what sample.py generates --------------------------

TRAIN_TINY = [
    "--device=cpu",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=8",
    "--gradient_accumulation_steps=1",
    "--eval_iters=1",
    "--max_iters=30",
    "--eval_interval=30",
    "--learning_rate=3e-3",
    "--warmup_iters=5",
]
LLAMA_FLAGS = ["--pos_embedding=rope", "--norm=rmsnorm", "--mlp=swiglu", "--n_kv_head=1", "--tie_embeddings=False"]


def sampled(capsys, argv) -> str:
    """sample.py's greedy text: everything it printed before the separator line."""
    import sample

    capsys.readouterr()
    sample.main([*argv, "--device=cpu", "--temperature=0", "--num_samples=1"])
    return capsys.readouterr().out.rsplit("\n---------------", 1)[0]


@pytest.fixture
def bpe_data(tmp_path):
    """A tiny GPT-2 BPE dataset (prepare/shakespeare.py on the test corpus)."""
    import shakespeare
    from conftest import shakespeare_text

    out = tmp_path / "data" / "tiny_bpe"
    out.mkdir(parents=True)
    (out / "input.txt").write_text(shakespeare_text(30_000), encoding="utf-8")
    shakespeare.main([f"--out={out}"])
    return str(tmp_path / "data")


@pytest.mark.parametrize(
    "tokens,layout", [("char", "gpt2"), ("char", "llama"), ("bpe", "gpt2")], ids=["char-gpt2", "char-llama", "bpe-gpt2"]
)
def test_pipeline_on_an_export_generates_what_sample_generates(tokens, layout, tmp_path, capsys, request):
    if tokens == "bpe":
        from conftest import GPT2_AVAILABLE

        if not GPT2_AVAILABLE:
            pytest.skip("the GPT-2 tokenizer needs the network or TIKTOKEN_CACHE_DIR with tiktoken's cache files")
        data_root, dataset = request.getfixturevalue("bpe_data"), "tiny_bpe"
    else:
        data_root, dataset = request.getfixturevalue("char_data"), "tiny_char"
    out, hf_dir = str(tmp_path / "out"), str(tmp_path / "hf")
    flags = LLAMA_FLAGS if layout == "llama" else []  # the GPT-2 layout from a model without biases (bias=False)
    train.main([f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={out}", *TRAIN_TINY, *flags])
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"])
    assert f"{layout} layout" in capsys.readouterr().out

    prompt, n = "ROMEO:", 24
    ours = sampled(capsys, [f"--out_dir={out}", f"--start={prompt}", f"--max_new_tokens={n}"])
    generate = transformers.pipeline("text-generation", model=hf_dir, device="cpu")
    theirs = generate(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert theirs == ours
    assert sampled(capsys, [f"--init_from={hf_dir}", f"--start={prompt}", f"--max_new_tokens={n}"]) == ours
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt


# --- from_pretrained on a transformers GPT-2 directory ----------------------------------------------------------------


def test_from_pretrained_crops_block_size(hf_gpt2):
    hf, directory = hf_gpt2
    ours = from_pretrained(directory, override_args={"block_size": 16, "dropout": 0.0}).eval()
    assert ours.config.block_size == 16
    assert ours.transformer.wpe.weight.shape == (16, 64)
    idx = torch.randint(100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx, all_logits=True)
        assert (logits - expected).abs().max().item() < 1e-4
        with pytest.raises(ValueError, match="block_size"):
            ours(torch.zeros(1, 17, dtype=torch.long))


def test_from_pretrained_rejects_other_overrides(hf_gpt2):
    _, directory = hf_gpt2
    with pytest.raises(ValueError, match="overridden"):
        from_pretrained(directory, override_args={"n_layer": 1})
