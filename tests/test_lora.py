"""LoRA: a fresh adapter changes nothing, only adapters train, merged equals unmerged, checkpoints hold the adapters
and name their base by its hash, resume is bit-exact, the export is a plain model transformers loads with the same
logits, and the memory check counts optimizer state for the adapters alone."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_chat import prepare
from test_distributed import CONFIG
from test_train import args, records, step_losses

import train
from engine import memory
from engine.checkpoint import find_checkpoint, load_model, read_meta
from engine.errors import UserError
from engine.lora import LoRALinear, add_lora, lora_params, merge_lora
from model import GPT, GPTConfig
from tools import export_hf

LORA = ["--lora_rank=4", "--lora_alpha=8"]


def base_model(**kw) -> GPT:
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def test_a_fresh_adapter_changes_nothing_and_merged_equals_unmerged():
    torch.manual_seed(0)
    model = base_model(mlp="swiglu")
    x = torch.randint(64, (2, 16))
    before = model(x, all_logits=True)[0]
    add_lora(model, rank=4, alpha=8, targets=("attn", "mlp"))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 5  # per block: c_attn, c_proj; c_fc, c_gate, c_proj
    assert torch.equal(model(x, all_logits=True)[0], before)  # B starts at zero
    with torch.no_grad():
        for m in wrapped:
            m.lora_B.normal_(0, 0.1)
    unmerged = model(x, all_logits=True)[0]
    assert (unmerged - before).abs().max() > 1e-2
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x, all_logits=True)[0], unmerged, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [] and "transformer.h.0.attn.c_attn.weight" in model.state_dict()


def test_only_the_adapters_train(char_data, tmp_path):
    out = str(tmp_path / "lora")
    base = str(tmp_path / "base")
    train.main(args(char_data, base, "--max_iters=4", "--eval_interval=4"))
    train.main(args(char_data, out, f"--init_from={base}", "--max_iters=6", "--eval_interval=6", *LORA))
    before = load_file(os.path.join(find_checkpoint(base), "model.safetensors"))
    ckpt = find_checkpoint(out)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    assert saved and all(".lora_A" in k or ".lora_B" in k for k in saved)  # the checkpoint holds the adapters only
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_B"))  # and they trained
    meta = read_meta(ckpt)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base_from"] == base
    assert meta["lora"]["base"] == f"lora-base-{meta['lora']['base_sha256'][:16]}"
    model, _ = load_model(ckpt)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if k in state)  # the frozen base is unchanged
    opt = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)["optimizers"][0]
    assert set(opt["state"]) == set(saved)  # optimizer state for the adapters alone
    # a changed base is refused in one line rather than silently giving another model
    base_file = os.path.join(out, meta["lora"]["base"], "model.safetensors")
    with open(base_file, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(UserError, match="LoRA checkpoint whose base .* is missing or changed"):
        load_model(ckpt)


def test_resume_with_lora_is_bit_exact(char_data, tmp_path):
    base, a, b = (str(tmp_path / n) for n in ("base", "a", "b"))
    train.main(args(char_data, base, "--max_iters=2", "--eval_interval=2"))
    lora = [f"--init_from={base}", "--eval_interval=6", *LORA]
    train.main(args(char_data, a, "--max_iters=12", *lora))
    train.main(args(char_data, b, "--max_iters=6", *lora))
    resume = [a for a in lora if not a.startswith("--init_from")]
    train.main(args(char_data, b, "--max_iters=12", "--init_from=resume", *resume))
    la, lb = step_losses(a), step_losses(b)
    assert [la[i] for i in range(6, 12)] == [lb[i] for i in range(6, 12)]
    wa, wb = (load_file(os.path.join(find_checkpoint(d), "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UserError, match="lora_rank"):  # the adapters' optimizer state would not fit another rank
        train.main(args(char_data, b, "--max_iters=14", "--init_from=resume", "--lora_rank=8", "--eval_interval=6"))


def test_the_export_is_a_plain_model_with_the_same_logits(char_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, out, hf = str(tmp_path / "base"), str(tmp_path / "lora"), str(tmp_path / "hf")
    train.main(args(char_data, base, "--max_iters=2", "--eval_interval=2"))
    train.main(args(char_data, out, f"--init_from={base}", "--max_iters=4", "--eval_interval=4", *LORA))
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf}"])
    ours, _ = load_model(find_checkpoint(out))
    ours.eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with open(os.path.join(hf, "config.json")) as f:
        assert "lora" not in json.dumps(json.load(f))
    x = torch.randint(60, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x, all_logits=True)[0], atol=1e-4, rtol=1e-4)


def test_lora_lets_a_model_fit_where_full_adamw_would_not(monkeypatch):
    xl = GPTConfig(block_size=1024, vocab_size=50304, n_layer=48, n_head=25, n_embd=1600)
    monkeypatch.setattr(memory, "device_memory", lambda device: 16 * 2**30)  # a 16 GiB GPU
    with pytest.raises(UserError, match="training this model needs at least"):
        memory.check_fits(xl, "cuda:0", batch_size=1, checkpointing=True)
    with torch.device("meta"):
        adapters = lora_params(GPT(xl), 8, ("attn", "mlp"))
    assert adapters == 48 * 8 * ((1600 + 4800) + (1600 + 1600) + (1600 + 6400) + (6400 + 1600))
    memory.check_fits(xl, "cuda:0", batch_size=1, checkpointing=True, trainable=adapters)  # 6 GiB of weights: fits


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="lora_targets"):
        train.TrainConfig(lora_rank=4, lora_targets="attn,embeddings")


@pytest.mark.parametrize("again", [LORA, []], ids=["lora-again", "every-weight"])
def test_a_run_started_from_a_lora_run_starts_from_its_adapted_model(char_data, tmp_path, again):
    """--init_from=<a LoRA run> starts from that run's model (base and adapters, merged), trains what the new flags
    say, and writes checkpoints that resume and load."""
    base, lora, out = (str(tmp_path / n) for n in ("base", "lora", "out"))

    def args32(out_dir, *extra):  # merged and unmerged adapters agree to float32's rounding, not to bf16's
        return args(char_data, out_dir, "--dtype=float32", *extra)

    train.main(args32(base, "--max_iters=2", "--eval_interval=2"))
    train.main(args32(lora, f"--init_from={base}", "--max_iters=6", "--eval_interval=6", "--learning_rate=2e-2", *LORA))
    train.main(args32(out, f"--init_from={lora}", "--max_iters=4", "--eval_interval=4", *again))
    val = {d: [r["val_loss"] for r in records(d) if "val_loss" in r] for d in (base, lora, out)}
    assert abs(val[lora][-1] - val[base][-1]) > 1e-3  # the adapters changed the model
    assert val[out][0] == pytest.approx(val[lora][-1], abs=1e-5)  # and the new run starts from it
    ckpt = find_checkpoint(out)
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    start, _ = load_model(find_checkpoint(lora))
    merge_lora(start)
    if again:  # new adapters on the merged model: the base saved beside them is that model
        assert weights and all(".lora_" in k for k in weights)
        base_dir = os.path.join(out, read_meta(ckpt)["lora"]["base"])
        saved_base = load_file(os.path.join(base_dir, "model.safetensors"))
        assert all(torch.equal(saved_base[k], v) for k, v in start.state_dict().items() if k in saved_base)
    else:  # every weight trained, the former base included
        assert not any(".lora_" in k for k in weights)
        name = "transformer.h.0.attn.c_attn.weight"
        assert not torch.equal(weights[name], start.state_dict()[name])
    load_model(ckpt)  # what sample.py, tools/evaluate.py and tools/export_hf.py do
    train.main(args32(out, "--init_from=resume", "--max_iters=6", "--eval_interval=4", *again))
    assert max(step_losses(out)) == 5


@pytest.mark.parametrize("tie", [True, False])
def test_lora_on_chat_data_trains_only_the_chat_tokens_rows(tmp_path, tie):
    """LoRA's memory claim holds on chat data: the embedding rows that train (and get optimizer state) are the chat
    tokens' alone; the base's rows stay as they were, and the merged export computes what the adapted model does."""
    root = prepare(tmp_path)
    base, out = str(tmp_path / "base"), str(tmp_path / "out")
    run = [f"--data_root={root}", "--dataset=chat", *CONFIG, "--block_size=48", "--dtype=float32"]
    train.main([*run, f"--out_dir={base}", "--max_iters=2", "--eval_interval=2", f"--tie_embeddings={tie}"])
    train.main([*run, f"--out_dir={out}", f"--init_from={base}", "--max_iters=4", "--eval_interval=4", *LORA])
    ckpt = find_checkpoint(out)
    start = min(read_meta(ckpt)["data"]["chat"]["special"].values())  # the first chat token's id
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    rows = {k for k in saved if ".lora_" not in k}
    assert rows == {"transformer.wte.rows"} | (set() if tie else {"lm_head.rows"})
    assert saved["transformer.wte.rows"].shape[0] == 64 - start
    opt = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)["optimizers"][0]
    assert sum(s["exp_avg"].numel() for s in opt["state"].values()) == sum(t.numel() for t in saved.values())
    model, _ = load_model(ckpt)
    before = load_file(os.path.join(find_checkpoint(base), "model.safetensors"))["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight[:start], before[:start])  # the base's rows did not move
    assert not torch.equal(model.transformer.wte.rows, before[start:])  # the chat tokens' did
    x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        adapted = model(x, all_logits=True)[0]
        merge_lora(model)
        torch.testing.assert_close(model(x, all_logits=True)[0], adapted, atol=1e-5, rtol=1e-5)
    if tie:
        assert model.transformer.wte.weight is model.lm_head.weight  # merged, still one matrix
