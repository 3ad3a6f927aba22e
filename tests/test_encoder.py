"""Encoders (arch=encoder): a BERT-style masked-language model from the same model.py. The anchor is outside our
code: a random-weight transformers BertForMaskedLM and our import of it give the same logits, padding included."""

import json
import os
import re

import pytest
import torch
from conftest import rehash_checkpoint
from test_bad_inputs import assert_user_error, run
from test_distributed import rank_logs, torchrun
from test_train import records

import sample
import train
from engine.checkpoint import find_checkpoint, load_model, read_meta
from engine.data import Tokenizer, load_data
from engine.errors import UserError
from engine.hf_interop import UnsupportedModel, from_pretrained, hf_format, save_hf
from engine.masking import Masking, special_tokens
from model import GPT, GPTConfig
from tools import evaluate, export_hf

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


def test_masking_follows_bert_80_10_10_over_many_draws():
    """15% of the text tokens chosen, never [CLS] or [SEP]; of the chosen 80% [MASK], 10% random, 10% themselves; the
    targets are exactly the chosen tokens. Counted over ~100k tokens: each share within 1% of BERT's."""
    masking = Masking(text_vocab_size=1000, probability=0.15)
    special = masking.special
    text = torch.randint(0, 1000, (64, 200))
    counts = torch.zeros(4)  # chosen, [MASK], random other token, kept
    total = 0
    for k in range(8):
        x, y = masking.mask(text, (1, 2, k))
        assert (x[:, 0] == special["[CLS]"]).all() and (x[:, -1] == special["[SEP]"]).all()
        assert (y[:, 0] == -1).all() and (y[:, -1] == -1).all()
        inner_x, inner_y = x[:, 1:-1], y[:, 1:-1]
        chosen = inner_y >= 0
        assert torch.equal(inner_y[chosen], text[chosen])  # the target is the original token
        assert torch.equal(inner_x[~chosen], text[~chosen])  # nothing else changed
        masked = inner_x == special["[MASK]"]
        assert not (masked & ~chosen).any()
        counts += torch.tensor(
            [chosen.sum(), (masked & chosen).sum(), (chosen & ~masked & (inner_x != text)).sum(), 0], dtype=torch.float
        )
        counts[3] += (chosen & (inner_x == text)).sum()
        total += text.numel()
        assert masking.count(64, 202, (1, 2, k)) == int(chosen.sum())  # counted without the data
    share = counts[0] / total
    assert abs(share - 0.15) < 0.01
    mask_share, random_share, kept_share = (counts[1:] / counts[0]).tolist()
    # a random replacement can draw the token itself (1 in 1000): it counts as kept
    assert abs(mask_share - 0.8) < 0.01 and abs(random_share - 0.1) < 0.01 and abs(kept_share - 0.1) < 0.01


def test_the_same_key_masks_the_same_positions_and_another_key_others():
    masking = Masking(text_vocab_size=50)
    text = torch.randint(0, 50, (4, 30))
    a, b, c = (masking.mask(text, key) for key in ((7, 0, 3, 1), (7, 0, 3, 1), (7, 0, 3, 2)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_the_masked_loss_is_the_mean_cross_entropy_over_the_chosen_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="encoder", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)).eval()
    masking = Masking(text_vocab_size=60)
    x, y = masking.mask(torch.randint(0, 60, (3, 30)), (1, 0, 0, 0))
    logits, loss = model(x, y)
    chosen = (y >= 0).nonzero().tolist()
    by_hand = [-torch.log_softmax(logits[b, t].double(), -1)[y[b, t]] for b, t in chosen]
    assert len(chosen) > 0 and abs(loss.item() - torch.stack(by_hand).mean().item()) < 1e-5


ENCODER = ["--arch=encoder", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32"]
ENCODER += ["--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--dropout=0.0"]
ENCODER += ["--gradient_accumulation_steps=2", "--learning_rate=3e-3", "--warmup_iters=2", "--eval_interval=3"]


def train_encoder(char_data, out_dir, *flags: str) -> int:
    """train.py on the tiny character data as a small encoder (ENCODER), into out_dir."""
    return train.main([*ENCODER, f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out_dir}", *flags])


def losses_of(out_dir) -> dict:
    return {r["iter"]: r["loss"] for r in records(out_dir) if "lr" in r}


def test_an_encoder_trains_and_resumes_bit_exact(char_data, tmp_path):
    """Masks are drawn from (seed, iteration, micro-step): a run stopped at 3 and resumed to 6 takes the uninterrupted
    run's steps exactly. Evaluation logs the masked-token loss and accuracy; checkpoints record the special tokens."""
    run = [*ENCODER, f"--data_root={char_data}", "--dataset=tiny_char"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*run, f"--out_dir={whole}", "--max_iters=6"]) == 0
    train.main([*run, f"--out_dir={parts}", "--max_iters=3"])
    train.main([*run, f"--out_dir={parts}", "--max_iters=6", "--init_from=resume"])
    assert losses_of(whole) == losses_of(parts) and len(losses_of(whole)) == 6
    evaluations = [r for r in records(whole) if "val_loss" in r]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1 for r in evaluations)
    meta, text_vocab = read_meta(find_checkpoint(whole)), load_data(f"{char_data}/tiny_char", 16).meta["vocab_size"]
    assert meta["model_config"]["arch"] == "encoder" and meta["encoder"]["special"] == special_tokens(text_vocab)
    assert meta["model_config"]["vocab_size"] >= text_vocab + 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_an_encoder_as_one_process(mode, char_data, tmp_path):
    run = [*ENCODER, f"--data_root={char_data}", "--dataset=tiny_char", "--max_iters=4"]
    run.append("--dtype=float32")  # as test_distributed.py: bf16 (AMX CPUs) under FSDP is mixed precision, not autocast
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ddp}", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = records(single), records(ddp)
    assert [r["iter"] for r in ours] == [r["iter"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "train_loss", "val_loss", "val_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval_task=hellaswag"], "arch=encoder has none"),
        (["--mlm_probability=1"], "mlm_probability must be in (0, 1)"),
        (["--arch=bert"], "arch must be one of decoder, encoder"),
    ],
)
def test_what_an_encoder_cannot_do_is_one_line(flags, message, char_data, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        train_encoder(char_data, f"{tmp_path}/o", *flags)


def test_a_bert_directory_trains_only_as_an_encoder(char_data, tmp_path):
    path = tiny_bert(tmp_path)
    run = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={tmp_path}/o", f"--init_from={path}"]
    with pytest.raises(UserError, match="holds an encoder: train it with --arch=encoder"):
        train.main([*ENCODER[1:], *run])


def test_fill_mask_prints_the_encoders_top_fillers_for_each_mask(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train_encoder(char_data, out, "--max_iters=3")
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--start=be [MASK]ot t[MASK]", "--device=cpu", "--top_k=3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[MASK] 1", "[MASK] 2"]
    # the same numbers straight from the model: [CLS] text [SEP], the text vocabulary's softmax at each [MASK]
    model, meta = load_model(find_checkpoint(out))
    tokenizer, special = Tokenizer(meta["data"]), meta["encoder"]["special"]
    ids = [special["[CLS]"], *tokenizer.encode("be "), special["[MASK]"], *tokenizer.encode("ot t")]
    ids += [special["[MASK]"], special["[SEP]"]]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids]))[0][0]
    for line, position in zip(lines, (4, 9), strict=True):
        probs = torch.softmax(logits[position], -1)[: special["[CLS]"]]
        value, index = probs.max(-1)
        assert line.split(": ", 1)[1].split(" | ")[0] == f"{tokenizer.decode([int(index)])!r} {value:.4f}"
        assert len(line.split(" | ")) == 3


@pytest.mark.parametrize(
    "start, message", [("no mask here", "the prompt has no [MASK]"), ("[MASK] " * 20, "the encoder reads 16")]
)
def test_fill_mask_refuses_a_prompt_it_cannot_fill_in_one_line(start, message, char_data, tmp_path):
    out = str(tmp_path / "out")
    train_encoder(char_data, out, "--max_iters=1")
    with pytest.raises(UserError, match=re.escape(message)):
        sample.main([f"--out_dir={out}", f"--start={start}", "--device=cpu"])


@pytest.mark.parametrize(
    "tool, flags",
    [
        ("tools/attention.py", ["--start=to be", "--png={tmp}/a.png"]),
        ("tools/export_hf.py", ["--hf_dir={tmp}/hf"]),
    ],
)
def test_the_decoder_tools_refuse_an_encoder_in_one_line(tool, flags, char_data, tmp_path):
    out = str(tmp_path / "out")
    train_encoder(char_data, out, "--max_iters=1")
    result = run(tool, f"--out_dir={out}", *(f.format(tmp=tmp_path) for f in flags))
    assert_user_error(result, "encoder")
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "a.png")


def test_a_checkpoint_saved_before_arch_existed_resumes_as_a_decoder(char_data, tmp_path):
    """Checkpoints written before the arch switch have no arch in their configs: they ran as decoders."""
    out = str(tmp_path / "out")
    run = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *ENCODER[1:]]
    train.main([*run, "--max_iters=2"])
    path = find_checkpoint(out)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    for config in ("model_config", "train_config"):
        del meta[config]["arch"]
        meta[config].pop("mlm_probability", None)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    rehash_checkpoint(path)
    assert train.main([*run, "--max_iters=4", "--init_from=resume"]) == 0


def test_pseudo_perplexity_masks_each_token_in_turn(char_data, tmp_path, capsys):
    """evaluate.py's batched, padded pseudo-log-likelihood equals one forward pass per masked token, by hand."""
    out, text = str(tmp_path / "out"), tmp_path / "text.txt"
    train_encoder(char_data, out, "--max_iters=2")
    text.write_text("to be or not to be, that is the question")  # 40 characters: 3 chunks of 14
    result = evaluate.main([f"--out_dir={out}", f"--text={text}", "--device=cpu", "--dtype=float32"])
    assert "pseudo-perplexity" in capsys.readouterr().out
    model, meta = load_model(find_checkpoint(out))
    tokenizer, special = Tokenizer(meta["data"]), meta["encoder"]["special"]
    ids = tokenizer.encode(text.read_text())
    total = 0.0
    for begin in range(0, len(ids), 14):
        chunk = ids[begin : begin + 14]
        for i in range(len(chunk)):
            x = [special["[CLS]"], *chunk[:i], special["[MASK]"], *chunk[i + 1 :], special["[SEP]"]]
            with torch.no_grad():
                logits = model.eval()(torch.tensor([x]))[0][0, i + 1]
            total += torch.log_softmax(logits.double(), -1)[chunk[i]].item()
    assert result["pseudo_log_likelihood"] == pytest.approx(total, rel=1e-5)


def test_masked_token_scores_of_a_split_are_the_same_every_time(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train_encoder(char_data, out, "--max_iters=2")
    argv = [f"--out_dir={out}", f"--tokens={char_data}/tiny_char/val.bin", "--device=cpu", "--max_tokens=2000"]
    first, second = evaluate.main(argv), evaluate.main(argv)
    assert first == second and 0 <= first["accuracy"] <= 1 and first["loss"] > 0
    assert "masked-token accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("bias", [True, False])
def test_an_exported_encoder_is_a_bert_with_the_same_logits(bias, char_data, tmp_path):
    """save_hf writes an encoder as BertForMaskedLM: transformers' logits equal ours (padding included), and reading
    the export back gives the same model; biases a model trained without are written as zeros."""
    out, hf_dir = str(tmp_path / "out"), str(tmp_path / "hf")
    train_encoder(char_data, out, "--max_iters=3", "--norm_position=post", "--mlp=gelu", f"--bias={bias}")
    ours, _ = load_model(find_checkpoint(out))
    assert save_hf(ours.eval(), hf_dir) == "bert"
    theirs = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()
    back = from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 60, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, padding_mask=mask.bool())[0]
        again = back(ids, padding_mask=mask.bool())[0]
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4 and (again[real] - got[real]).abs().max() < 1e-5


def test_an_encoder_bert_cannot_express_is_refused_naming_what_breaks():
    config = GPTConfig(arch="encoder", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, norm="rmsnorm")
    with pytest.raises(UnsupportedModel, match=r"norm=layernorm \(this model: rmsnorm\), norm_position=post"):
        hf_format(config)


def test_the_fill_mask_pipeline_on_an_export_agrees_with_sample_py(char_data, tmp_path, capsys):
    """tools/export_hf.py writes the encoder and its tokenizer (special tokens, `[CLS] text [SEP]`): transformers'
    fill-mask pipeline gives the fillers sample.py prints, with the same probabilities."""
    out, hf_dir = str(tmp_path / "out"), str(tmp_path / "hf")
    train_encoder(char_data, out, "--max_iters=30", "--norm_position=post", "--mlp=gelu", "--bias=True")
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"])
    capsys.readouterr()
    prompt = "be [MASK]ot t[MASK]"
    sample.main([f"--out_dir={out}", f"--start={prompt}", "--device=cpu", "--dtype=float32", "--top_k=3"])
    ours = [line.split(": ", 1)[1].split(" | ") for line in capsys.readouterr().out.splitlines()]
    fill = transformers.pipeline("fill-mask", model=hf_dir, top_k=3, device="cpu")
    theirs = fill(prompt)
    assert len(ours) == len(theirs) == 2
    for mine, their in zip(ours, theirs, strict=True):
        assert [f"{r['token_str']!r} {r['score']:.4f}" for r in their] == mine


def test_pseudo_perplexity_equals_transformers_on_the_export(char_data, tmp_path):
    """The pseudo-log-likelihood evaluate.py reports, computed independently by transformers' BertForMaskedLM on the
    exported directory, with its own tokenizer building `[CLS] chunk [SEP]`."""
    out, hf_dir, text = str(tmp_path / "out"), str(tmp_path / "hf"), tmp_path / "text.txt"
    train_encoder(char_data, out, "--max_iters=3", "--norm_position=post", "--mlp=gelu", "--bias=True")
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"])
    text.write_text("to be or not to be, that is the question")
    ours = evaluate.main([f"--out_dir={out}", f"--text={text}", "--device=cpu", "--dtype=float32"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()
    chars = text.read_text()  # one token per character: chunks of 14 characters are chunks of 14 tokens
    total = 0.0
    for begin in range(0, len(chars), 14):
        x = tokenizer(chars[begin : begin + 14])["input_ids"]  # [CLS] chunk [SEP], by the tokenizer's post-processor
        assert len(x) == len(chars[begin : begin + 14]) + 2
        for i in range(1, len(x) - 1):
            masked = [*x[:i], tokenizer.mask_token_id, *x[i + 1 :]]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([masked])).logits[0, i]
            total += torch.log_softmax(logits.double(), -1)[x[i]].item()
    assert ours["pseudo_log_likelihood"] == pytest.approx(total, rel=1e-4)
