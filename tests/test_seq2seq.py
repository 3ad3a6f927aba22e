"""Encoder-decoders (arch=encoder_decoder): T5 from the same model.py. The anchor is outside our code: random-weight
transformers T5ForConditionalGeneration models of both layouts (original T5: ReLU, tied output rescaled; v1.1: gated
GELU, untied) and our import of them give the same logits, padding included; our export loads back in transformers
with the same logits; the decoder's KV and cross-attention caches equal the uncached forward."""

import json
import re

import pytest
import seq2seq as prepare_seq2seq
import torch
from test_bad_inputs import assert_user_error, run
from test_distributed import rank_logs, torchrun
from test_encoder import losses_of
from test_train import records

import sample
import train
from engine import seq2seq
from engine.checkpoint import find_checkpoint, load_model, read_meta
from engine.data import Tokenizer, load_data
from engine.errors import UserError
from engine.hf_interop import UnsupportedModel, from_pretrained, hf_format, save_hf
from engine.seq2seq import Pairs, SpanCorruption, pairs_of, span_lengths
from model import GPT, GPTConfig, t5_buckets
from tools import evaluate, export_hf, sizing

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


# --- data and training -------------------------------------------------------------------------------------------


def write_pairs(path, pairs) -> str:
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs), encoding="utf-8")
    return str(path)


@pytest.fixture
def reverse_data(tmp_path):
    """data root with "reverse": prepare/reverse.py's task, small."""
    import reverse

    reverse.main([f"--out={tmp_path}/data/reverse", "--n_train=300", "--n_val=20"])
    return str(tmp_path / "data")


def test_prepare_writes_sources_and_targets_in_order(reverse_data):
    data = load_data(f"{reverse_data}/reverse", 16)
    special = data.seq2seq["special"]
    assert special == {"<pad>": 26, "</s>": 27} and data.meta["vocab_size"] == 28  # after the 26 letters
    rows = [json.loads(line) for line in open(f"{reverse_data}/reverse/val.jsonl", encoding="utf-8")]
    sources, targets = pairs_of(data, "val", range(len(rows)))
    decode = lambda ids: "".join(data.meta["chars"][i] for i in ids)  # noqa: E731
    assert [decode(s) for s in sources] == [r["source"] for r in rows]
    assert [decode(t) for t in targets] == [r["target"] for r in rows] == [r["source"][::-1] for r in rows]


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([("a", "b"), ("", "c")], "row 2 of"),
        ([("a", "b"), ("c", None)], "has no text in column 'target'"),
        ([("a", "b")], "a train and a val split need at least 2"),
    ],
)
def test_bad_pairs_are_one_line_and_leave_nothing(pairs, message, tmp_path):
    source = write_pairs(tmp_path / "pairs.jsonl", pairs)
    result = run("prepare/seq2seq.py", f"--input={source}", f"--out={tmp_path}/out", "--tokenizer=char")
    assert_user_error(result, message)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_batch_is_source_end_padded_and_target_end_then_ignored(reverse_data):
    data = load_data(f"{reverse_data}/reverse", 16)
    pairs = Pairs(data, data.seq2seq["special"])
    x, y = pairs.batch(data, "train", 6, 10, (5, 0, 1, 0), "cpu")
    sources, targets = pairs_of(data, "train", pairs.picks("train", 6, (5, 0, 1, 0)))
    for r in range(6):
        src, tgt = [*sources[r][:9].tolist(), 27], [*targets[r][:9].tolist(), 27]
        assert x[r].tolist() == src + [26] * (10 - len(src)) and y[r].tolist() == tgt + [-1] * (10 - len(tgt))
    assert pairs.count(6, 10, (5, 0, 1, 0)) == int((y >= 0).sum())


def test_the_loss_is_the_mean_cross_entropy_over_the_target_tokens(reverse_data):
    data = load_data(f"{reverse_data}/reverse", 16)
    config = GPTConfig(arch="encoder_decoder", block_size=16, vocab_size=28, n_layer=1, n_head=2, n_embd=16, pad_id=26)
    model = GPT(config).eval()
    x, y = Pairs(data, data.seq2seq["special"]).batch(data, "train", 4, 16, (1,), "cpu")
    logits, loss = model(x, y)
    decoder_input = torch.cat([torch.full((4, 1), 26), y[:, :-1].clamp(min=0).masked_fill(y[:, :-1] < 0, 26)], 1)
    memory, keep = model.encode(x)
    assert torch.allclose(model.decode(decoder_input, memory, keep), logits)  # teacher forcing, shifted right
    chosen = (y >= 0).nonzero().tolist()
    by_hand = torch.stack([-torch.log_softmax(logits[b, t].double(), -1)[y[b, t]] for b, t in chosen]).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5


SEQ2SEQ = ["--arch=encoder_decoder", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32"]
SEQ2SEQ += ["--block_size=16", "--batch_size=8", "--eval_iters=2", "--log_interval=1", "--dropout=0.0", "--bias=False"]
SEQ2SEQ += ["--gradient_accumulation_steps=2", "--learning_rate=3e-3", "--warmup_iters=2", "--eval_interval=3"]
SEQ2SEQ += ["--pos_embedding=t5", "--norm=rmsnorm", "--mlp=geglu", "--attn_scale=False", "--tie_embeddings=False"]


def train_seq2seq(data_root, out_dir, *flags: str) -> int:
    return train.main([*SEQ2SEQ, f"--data_root={data_root}", "--dataset=reverse", f"--out_dir={out_dir}", *flags])


def test_an_encoder_decoder_trains_and_resumes_bit_exact(reverse_data, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train_seq2seq(reverse_data, whole, "--max_iters=6") == 0
    train_seq2seq(reverse_data, parts, "--max_iters=3")
    train_seq2seq(reverse_data, parts, "--max_iters=6", "--init_from=resume")
    assert losses_of(whole) == losses_of(parts) and len(losses_of(whole)) == 6
    meta = read_meta(find_checkpoint(whole))
    assert meta["model_config"]["arch"] == "encoder_decoder" and meta["model_config"]["pad_id"] == 26
    assert meta["encoder"]["special"] == {"<pad>": 26, "</s>": 27}
    assert all(0 <= r["val_accuracy"] <= 1 for r in records(whole) if "val_loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_an_encoder_decoder_as_one_process(mode, reverse_data, tmp_path):
    run_ = [*SEQ2SEQ, f"--data_root={reverse_data}", "--dataset=reverse", "--max_iters=4", "--dtype=float32"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*run_, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run_, f"--out_dir={ddp}", f"--fsdp={mode == 'fsdp'}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    for a, b in zip(records(single), records(ddp), strict=True):
        for key in ("loss", "train_loss", "val_loss", "val_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)


@pytest.mark.parametrize(
    "flags, data, message",
    [
        (["--arch=encoder_decoder"], "tiny_char", "holds no pairs: an encoder-decoder trains on"),
        (["--arch=decoder"], "reverse", "holds source-target pairs: train an encoder-decoder"),
        (["--health_interval=2"], "reverse", "health_interval is not supported for arch=encoder_decoder"),
    ],
)
def test_what_an_encoder_decoder_cannot_do_is_one_line(flags, data, message, reverse_data, char_data, tmp_path):
    root = reverse_data if data == "reverse" else char_data
    with pytest.raises(UserError, match=re.escape(message)):
        train.main([*SEQ2SEQ, f"--data_root={root}", f"--dataset={data}", f"--out_dir={tmp_path}/o", *flags])


def test_sample_transduces_each_line_and_the_caches_change_nothing(reverse_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train_seq2seq(reverse_data, out, "--max_iters=3")
    (tmp_path / "src.txt").write_text("abcd\n\nzyxwvu\n", encoding="utf-8")
    base = [f"--out_dir={out}", f"--start=FILE:{tmp_path}/src.txt", "--device=cpu", "--dtype=float32"]
    printed = {}
    for cache in (True, False):
        capsys.readouterr()
        sample.main([*base, "--temperature=0", f"--kv_cache={cache}", "--max_new_tokens=12"])
        printed[cache] = capsys.readouterr().out.splitlines()
    assert printed[True] == printed[False] and len(printed[True]) == 3 and printed[True][1] == ""
    assert all(set(line) <= set("abcdefghijklmnopqrstuvwxyz") for line in printed[True])


def test_an_exported_run_generates_in_transformers_what_sample_prints(reverse_data, tmp_path, capsys):
    out, hf = str(tmp_path / "out"), str(tmp_path / "hf")
    train_seq2seq(reverse_data, out, "--max_iters=6", "--learning_rate=1e-2")
    sources = ["abcdefg", "qwerty", "zz"]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    capsys.readouterr()
    sample.main([f"--out_dir={out}", f"--start=FILE:{tmp_path}/src.txt", "--temperature=0", "--device=cpu"])
    ours = capsys.readouterr().out.splitlines()
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf}"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    batch = tokenizer(sources, return_tensors="pt", padding=True)  # each source then </s>, padded with <pad>
    generated = model.generate(**batch, do_sample=False, max_new_tokens=16)
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == ours


def test_chrf_is_sacrebleus():
    # sacreBLEU 2.4.3's corpus_chrf gives these (it agreed with ours on 500 random corpora when this was written)
    assert evaluate.chrf(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(49.59348409966008, abs=1e-9)
    assert evaluate.chrf(["abc", "xyz"], ["abc", "xyz"]) == 100.0 and evaluate.chrf(["abc"], ["xyz"]) == 0.0
    assert evaluate.chrf(["a b", "q"], ["ab", ""]) == 100.0  # whitespace is removed; an empty reference adds nothing


def test_evaluate_scores_test_pairs_and_writes_predictions(reverse_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train_seq2seq(reverse_data, out, "--max_iters=6", "--learning_rate=1e-2")
    pairs = f"{reverse_data}/reverse/val.jsonl"
    flags = [f"--out_dir={out}", f"--pairs={pairs}", "--device=cpu", "--dtype=float32"]
    result = evaluate.main([*flags, f"--predictions={tmp_path}/p.jsonl"])
    rows = [json.loads(line) for line in open(pairs, encoding="utf-8")]
    written = [json.loads(line) for line in open(tmp_path / "p.jsonl", encoding="utf-8")]
    assert [w["source"] for w in written] == [r["source"] for r in rows]
    assert [w["prediction"] for w in written] == result["predictions"]
    capsys.readouterr()
    sample.main(
        [f"--out_dir={out}", f"--start={rows[0]['source']}", "--temperature=0", "--device=cpu", "--dtype=float32"]
    )
    assert capsys.readouterr().out.strip() == result["predictions"][0]  # the greedy prediction sample.py prints
    exact = sum(w["prediction"] == r["target"] for w, r in zip(written, rows, strict=True)) / len(rows)
    assert result["exact_match"] == exact
    assert result["chrf"] == pytest.approx(evaluate.chrf(result["predictions"], [r["target"] for r in rows]))
    model, _ = load_model(find_checkpoint(out))
    data = load_data(f"{reverse_data}/reverse", 16)
    sources, targets = pairs_of(data, "val", range(len(rows)))
    x, y = (seq2seq.rows(t, 27, fill, 16) for t, fill in ((sources, 26), (targets, -1)))
    with torch.no_grad():
        by_hand = model.eval()(x, y)[1].item()  # the mean over every target token of the split
    assert result["loss"] == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(UserError, match="score it on test pairs, --pairs=FILE"):
        evaluate.main([f"--out_dir={out}", f"--text={pairs}", "--device=cpu"])


def tiny_t5_with_tokenizer(tmp_path) -> str:
    """A random-weight T5 (v1.1 layout) directory with a SentencePiece-style Unigram tokenizer.json trained here, whose
    <pad> and </s> are ids 0 and 1 as in T5's own vocabulary: what a user downloads."""
    from conftest import shakespeare_text
    from tokenizers import SentencePieceUnigramTokenizer

    path = tmp_path / "t5-own-tokenizer"
    path.mkdir()
    tokenizer = SentencePieceUnigramTokenizer()
    lines = [line.lower() for line in shakespeare_text(60_000).splitlines() if line]
    tokenizer.train_from_iterator(lines, vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.save(str(path / "tokenizer.json"))
    config = transformers.T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return str(path)


def test_a_hugging_face_t5_fine_tunes_on_pairs_with_its_own_tokenizer(tmp_path, capsys):
    t5 = tiny_t5_with_tokenizer(tmp_path)
    words = ["to be or not to be", "the king is dead", "all the world is a stage", "what light through yonder"]
    pairs = [(w, " ".join(reversed(w.split()))) for w in words] * 3
    source = write_pairs(tmp_path / "pairs.jsonl", pairs)
    prepare_seq2seq.main([f"--input={source}", f"--tokenizer={t5}/tokenizer.json", f"--out={tmp_path}/data/words"])
    data = load_data(f"{tmp_path}/data/words", 16)
    assert data.seq2seq["special"] == {"<pad>": 0, "</s>": 1} and data.meta["vocab_size"] == 150  # its own ids
    out = str(tmp_path / "out")
    run_ = [*SEQ2SEQ, f"--data_root={tmp_path}/data", "--dataset=words", f"--out_dir={out}", "--block_size=32"]
    assert train.main([*run_, f"--init_from={t5}", "--max_iters=2"]) == 0
    model, meta = load_model(find_checkpoint(out))
    assert meta["encoder"]["special"] == {"<pad>": 0, "</s>": 1} and model.config.pad_id == 0
    capsys.readouterr()
    sample.main(
        [f"--out_dir={out}", "--start=the king is dead", "--temperature=0", "--device=cpu", "--max_new_tokens=8"]
    )
    assert len(capsys.readouterr().out.splitlines()) == 1


# --- span corruption: pretraining without pairs ------------------------------------------------------------------


def test_span_corruption_hides_15_percent_in_spans_and_the_target_gives_them_back():
    special = seq2seq.special_tokens(100, sentinels=True)
    corruption = SpanCorruption(special)
    windows = torch.randint(0, 100, (8, 63))
    sources, targets = corruption.corrupt(windows, (3, 0, 7, 1))
    sentinels = {special[f"<extra_id_{i}>"] for i in range(100)}
    _, _, noise, spans = span_lengths(63, (3, 0, 7, 1), 8)
    assert noise == round(63 * 0.15) and spans == round(noise / 3)
    for window, source, target in zip(windows.tolist(), sources.tolist(), targets.tolist(), strict=True):
        assert source[-1] == target[-1] == special["</s>"]
        hidden, span = {}, None
        for t in target[:-1]:  # each sentinel, then the tokens it hides
            span = t if t in sentinels else span
            hidden.setdefault(span, []).extend([] if t in sentinels else [t])
        rebuilt = [x for t in source[:-1] for x in (hidden[t] if t in sentinels else [t])]
        assert rebuilt == window  # the source with every span put back is the text
        assert sum(t in sentinels for t in source) == spans and all(len(v) >= 1 for v in hidden.values())
    again = corruption.corrupt(windows, (3, 0, 7, 1))
    other = corruption.corrupt(windows, (3, 0, 7, 2))
    assert torch.equal(again[0], sources) and not torch.equal(other[0], sources)  # drawn from the key alone


def test_span_corruption_pretrains_on_token_files_and_resumes_bit_exact(char_data, tmp_path):
    run_ = [*SEQ2SEQ, f"--data_root={char_data}", "--dataset=tiny_char", "--objective=span_corruption"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*run_, f"--out_dir={whole}", "--max_iters=6"]) == 0
    train.main([*run_, f"--out_dir={parts}", "--max_iters=3"])
    train.main([*run_, f"--out_dir={parts}", "--max_iters=6", "--init_from=resume"])
    assert losses_of(whole) == losses_of(parts) and len(losses_of(whole)) == 6
    meta = read_meta(find_checkpoint(whole))
    text_vocab = load_data(f"{char_data}/tiny_char", 16).meta["vocab_size"]
    assert meta["encoder"]["special"]["<extra_id_0>"] == text_vocab + 2
    assert meta["model_config"]["vocab_size"] >= text_vocab + 102
    data = load_data(f"{char_data}/tiny_char", 16)
    corruption = SpanCorruption(meta["encoder"]["special"])
    x, y = corruption.batch(data, "train", 4, 16, (1, 0, 0, 0), "cpu")
    assert corruption.count(4, 16, (1, 0, 0, 0)) == int((y >= 0).sum())
    with pytest.raises(UserError, match="add --arch=encoder_decoder"):
        train.main([*run_[1:], f"--out_dir={tmp_path}/o"])


def test_streaming_and_stop_strings_give_the_printed_outputs(reverse_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train_seq2seq(reverse_data, out, "--max_iters=6", "--learning_rate=1e-2")
    (tmp_path / "src.txt").write_text("abcdefg\nqwerty\n", encoding="utf-8")
    base = [f"--out_dir={out}", f"--start=FILE:{tmp_path}/src.txt", "--device=cpu", "--temperature=0"]
    printed = {}
    for name, flags in (("plain", []), ("stream", ["--stream=True", "--num_samples=1"])):
        capsys.readouterr()
        sample.main([*base, *flags])
        printed[name] = capsys.readouterr().out.splitlines()
    assert printed["stream"] == printed["plain"] and len(printed["plain"]) == 2
    stop = printed["plain"][0][1:2]  # a stop string cuts each output before its first occurrence, streamed or not
    assert stop and any(stop in line for line in printed["plain"])
    for flags in ([], ["--stream=True", "--num_samples=1"]):
        capsys.readouterr()
        sample.main([*base, f"--stop={stop}", *flags])
        assert capsys.readouterr().out.splitlines() == [line.split(stop)[0] for line in printed["plain"]]


def test_pairs_from_a_csv_with_a_trained_bpe_decode_back(tmp_path):
    rows = [("the cat sat", "le chat"), ("a dog ran", "un chien"), ("to be or not", "être ou pas")] * 4
    csv = tmp_path / "pairs.csv"
    csv.write_text("en,fr\n" + "".join(f"{s},{t}\n" for s, t in rows), encoding="utf-8")
    flags = [f"--input={csv}", "--source_column=en", "--target_column=fr", "--tokenizer=bpe", "--bpe_vocab_size=300"]
    prepare_seq2seq.main([*flags, f"--out={tmp_path}/d", "--val_fraction=0.25"])
    data = load_data(f"{tmp_path}/d", 8)
    tokenizer = Tokenizer(data.meta)
    text_vocab = data.meta["vocab_size"] - 2  # (a corpus this small trains fewer than 300 ids)
    assert data.seq2seq["special"] == {"<pad>": text_vocab, "</s>": text_vocab + 1}
    assert tokenizer.vocab_size == text_vocab + 2 and data.meta["tokenizer"] == "tokenizer.json"
    for split in ("train", "val"):
        n = data.meta["splits"][split]["documents"]
        sources, targets = pairs_of(data, split, range(n))
        decoded = {
            (tokenizer.decode(s.tolist()), tokenizer.decode(t.tolist())) for s, t in zip(sources, targets, strict=True)
        }
        assert decoded <= set(rows) and len(decoded) >= 1


# --- found in review: where encoder-decoders met the rest ------------------------------------------------------


def test_a_span_corruption_run_samples_exports_and_sizes(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    run_ = [*SEQ2SEQ, f"--data_root={char_data}", "--dataset=tiny_char", "--objective=span_corruption"]
    train.main([*run_, f"--out_dir={out}", "--max_iters=2"])
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--start=To be", "--temperature=0", "--device=cpu", "--max_new_tokens=6"])
    assert len(capsys.readouterr().out.splitlines()) == 1  # </s> and the sentinels are sampled and decoded by name
    export_hf.main([f"--out_dir={out}", f"--hf_dir={tmp_path}/hf"])  # crashed: taken for an encoder's [CLS]...
    tokenizer = transformers.AutoTokenizer.from_pretrained(f"{tmp_path}/hf")
    assert (
        tokenizer.convert_tokens_to_ids("<extra_id_0>")
        == read_meta(find_checkpoint(out))["encoder"]["special"]["<extra_id_0>"]
    )
    model, _ = load_model(find_checkpoint(out))
    assert sum(sizing.param_counts(model).values()) == model.num_params(non_embedding=False)


def test_a_config_too_large_in_its_decoder_is_refused_before_anything_is_built():
    from engine.memory import check_fits

    config = GPTConfig(arch="encoder_decoder", block_size=8, vocab_size=64, n_layer=1, n_dec_layer=100_000, n_head=4,
                       n_embd=256, pad_id=0)  # fmt: skip
    with pytest.raises(UserError):
        check_fits(config, "cpu")
    with pytest.raises(ValueError, match="rel_buckets >= 4"):
        GPTConfig(pos_embedding="t5", rel_buckets=2)


def test_bad_pairs_files_and_other_tokenizers_are_one_line(reverse_data, tmp_path):
    out = str(tmp_path / "out")
    train_seq2seq(reverse_data, out, "--max_iters=1")
    for content, message in (('{"source": "ab", "target": "ba"}\n{oops\n', ":2: not valid JSON"), ("[1]\n", ":1: not")):
        (tmp_path / "p.jsonl").write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match=message):
            evaluate.main([f"--out_dir={out}", f"--pairs={tmp_path}/p.jsonl", "--device=cpu"])
    # pairs prepared with a seq2seq dataset's tokenizer keep its ids; a model of another tokenizer is refused
    pairs = write_pairs(tmp_path / "more.jsonl", [("abc", "cba"), ("xyz", "zyx"), ("qq", "qq")])
    prepare_seq2seq.main([f"--input={pairs}", f"--tokenizer={reverse_data}/reverse", f"--out={reverse_data}/more"])
    assert load_data(f"{reverse_data}/more", 8).seq2seq["special"] == {"<pad>": 26, "</s>": 27}
    t5 = tiny_t5_with_tokenizer(tmp_path)
    with pytest.raises(UserError, match="pads with id 0, more with 26: prepare the data with the model's tokenizer"):
        train.main(
            [*SEQ2SEQ, f"--data_root={reverse_data}", "--dataset=more", f"--out_dir={tmp_path}/o", f"--init_from={t5}"]
        )
