"""Classifiers: an encoder fine-tuned on labelled texts (prepare/classify.py), its head on [CLS]. The anchor is
outside our code: a random-weight transformers BertForSequenceClassification and our import of it give the same
logits, padding included, and an exported classifier labels text as transformers' text-classification pipeline."""

import json
import re

import classify as prepare_classify
import numpy as np
import pytest
import torch
from test_bad_inputs import assert_user_error, run
from test_distributed import rank_logs, torchrun
from test_encoder import ENCODER, losses_of, train_encoder
from test_train import records

import sample
import train
from engine.checkpoint import find_checkpoint, load_model, read_meta
from engine.classify import Labelled, encoder_rows
from engine.data import load_data
from engine.errors import UserError
from engine.hf_interop import from_pretrained, save_hf
from engine.masking import special_tokens
from model import GPT, GPTConfig
from tools import evaluate, export_hf

transformers = pytest.importorskip("transformers")

LABELS = ("comedy", "history", "tragedy")


def tiny_bert_classifier(tmp_path, labels=LABELS) -> str:
    """A random-weight BertForSequenceClassification (pooler and classifier included) as a Hugging Face directory."""
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "bert-classifier"
    model.save_pretrained(path)
    return str(path)


def labelled_rows(n: int = 90) -> list[dict]:
    """Lines of the tiny character data's text, labelled by a rule a model can learn from the characters: whether
    the line holds a question mark, an exclamation mark, or neither (the labels are strings)."""
    from conftest import shakespeare_text

    lines = [line for line in shakespeare_text(100_000).splitlines() if len(line) > 10]
    rule = lambda line: "question" if "?" in line else "exclaim" if "!" in line else "plain"  # noqa: E731
    rows = [{"text": line, "label": rule(line)} for line in lines]
    picked = [r for r in rows if r["label"] != "plain"][: n // 2]
    return picked + [r for r in rows if r["label"] == "plain"][: n - len(picked)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def prepare_labelled(char_data: str, tmp_path) -> str:
    """A classification dataset of tiny_char's characters: data root char_data, dataset "labelled"."""
    source = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows())
    prepare_classify.main([f"--input={source}", f"--tokenizer={char_data}/tiny_char", f"--out={char_data}/labelled"])
    return char_data


@pytest.fixture
def labelled(char_data, tmp_path):
    return prepare_labelled(char_data, tmp_path)


def train_classifier(data_root, out_dir, *flags: str) -> int:
    """train.py on the labelled dataset: a small encoder (test_encoder.py's ENCODER), block_size 64."""
    run = [*ENCODER, f"--data_root={data_root}", "--dataset=labelled", f"--out_dir={out_dir}", "--block_size=64"]
    return train.main([*run, *flags])


# --- the data ------------------------------------------------------------------------------------------------------


def test_prepare_writes_each_text_its_label_and_the_label_set(labelled):
    data = load_data(f"{labelled}/labelled", 64)
    rows = labelled_rows()
    assert data.classify["labels"] == ["exclaim", "plain", "question"]  # alphabetical
    train_split, val = data.meta["splits"]["train"], data.meta["splits"]["val"]
    assert train_split["documents"] + val["documents"] == len(rows) and val["documents"] == 9  # 10% held out
    texts = {r["text"]: r["label"] for r in rows}
    tokenizer_chars = data.meta["chars"]
    starts, labels = data.memmap("train", "starts_file"), data.memmap("train", "labels_file")
    tokens = data.memmap("train")
    for i in range(len(starts) - 1):
        text = "".join(tokenizer_chars[t] for t in tokens[starts[i] : starts[i + 1]])
        assert data.classify["labels"][labels[i]] == texts[text]
    assert data.meta["chars"] == load_data(f"{labelled}/tiny_char", 16).meta["chars"]  # the encoder's vocabulary


def test_numeric_labels_sort_as_numbers_and_val_input_is_the_validation_split(tmp_path):
    rows = [{"text": f"text number {i}", "label": [2, 10, 1][i % 3]} for i in range(12)]
    train_file, val_file = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows[:4])
    prepare_classify.main(
        [f"--input={train_file}", f"--val_input={val_file}", "--tokenizer=char", f"--out={tmp_path}/d"]
    )
    meta = load_data(f"{tmp_path}/d", 8).meta
    assert meta["classify"]["labels"] == ["1", "2", "10"]
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 12


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"text": "fine", "label": "a"}, {"text": "  ", "label": "b"}], [], "has no text in column"),
        ([{"text": "fine", "label": "a"}, {"text": "good", "label": None}], [], "has no label in column"),
        ([{"text": "fine", "label": "a"}, {"text": "good", "label": [1]}], [], "has no label in column"),
        ([{"text": "fine", "label": "a"}] * 5, [], "a classifier needs at least 2"),
        (
            [{"text": "fine", "label": "a"}, {"text": "good", "label": "b"}],
            ["--tokenizer=DATA"],
            "not in the character vocabulary",
        ),
    ],
)
def test_bad_labelled_rows_are_one_line_and_leave_nothing(rows, extra, message, char_data, tmp_path):
    if extra == ["--tokenizer=DATA"]:
        rows = [{"text": "fine ~ text", "label": "a"}, {"text": "good", "label": "b"}] * 3  # "~" is not in tiny_char
        extra = [f"--tokenizer={char_data}/tiny_char"]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = run("prepare/classify.py", f"--input={source}", f"--out={tmp_path}/out", "--tokenizer=char", *extra)
    assert_user_error(result, message)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_damaged_labels_file_is_refused_at_load(labelled):
    path = f"{labelled}/labelled/val.labels.bin"
    labels = np.fromfile(path, dtype=np.int64)
    labels[3] = 7
    labels.tofile(path)
    meta_path = f"{labelled}/labelled/meta.json"
    meta = json.load(open(meta_path))
    meta["splits"]["val"].pop("labels_sha256")  # the values are checked, not only the hash
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="holds label 7 for text 3, not one of the 3 labels"):
        load_data(f"{labelled}/labelled", 64)


def test_a_batch_is_cls_text_sep_then_padding_with_its_labels(labelled):
    data = load_data(f"{labelled}/labelled", 64)
    special = special_tokens(data.meta["vocab_size"])
    x, y = Labelled(special).batch(data, "train", 5, 24, (1, 2, 3), "cpu")
    assert x.shape == (5, 24) and y.shape == (5,)
    starts, tokens, labels = (data.memmap("train", p) for p in ("starts_file", "file", "labels_file"))
    picks = np.random.default_rng([1, 2, 3]).integers(0, len(starts) - 1, size=5)
    for row, i in zip(x.tolist(), picks, strict=True):
        text = tokens[starts[i] : starts[i + 1]].tolist()[:22]
        assert row[: len(text) + 2] == [special["[CLS]"], *text, special["[SEP]"]]
        assert set(row[len(text) + 2 :]) <= {special["[PAD]"]}
    assert y.tolist() == labels[picks].tolist()


# --- the model -------------------------------------------------------------------------------------------------------


def tiny_classifier() -> GPT:
    config = GPTConfig(arch="encoder", n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=70)
    model = GPT(config)
    model.to_classifier(3, pad_id=69)
    return model.eval()


def test_the_loss_is_the_mean_cross_entropy_of_the_labels_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = tiny_classifier()
    texts = [torch.randint(0, 66, (n,)).tolist() for n in (5, 20, 11)]
    x = encoder_rows(texts, {"[CLS]": 66, "[SEP]": 67, "[MASK]": 68, "[PAD]": 69}, 24)
    y = torch.tensor([2, 0, 1])
    logits, loss = model(x, y)
    by_hand = torch.stack([-torch.log_softmax(logits[i].double(), -1)[y[i]] for i in range(3)]).mean()
    assert logits.shape == (3, 3) and abs(loss.item() - by_hand.item()) < 1e-6
    for i, text in enumerate(texts):  # each text alone, unpadded: the same logits as in the padded batch
        alone = model(torch.tensor([[66, *text, 67]]))[0][0]
        assert (alone - logits[i]).abs().max() < 1e-5


def test_bert_classifier_logits_equal_transformers_with_padding(tmp_path):
    path = tiny_bert_classifier(tmp_path)
    ours = from_pretrained(path).eval()
    theirs = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    assert ours.config.n_labels == 3 and ours.labels == list(LABELS) and ours.config.pad_id == 0
    torch.manual_seed(1)
    ids = torch.randint(1, 99, (3, 12))
    ids[1, 9:], ids[2, 5:] = 0, 0  # padded with [PAD] (id 0)
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids)[0]  # the model masks its own padding (pad_id)
    assert (got - expected).abs().max() < 1e-4


def test_an_exported_classifier_is_a_bert_classifier_with_the_same_logits(tmp_path):
    torch.manual_seed(2)
    model = tiny_classifier()
    model.config.norm_position, model.config.bias = "post", True
    model = GPT(model.config)  # post-norm, as BERT's layout needs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf(model.eval(), str(tmp_path / "hf"), labels=["x", "y", "z"])
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label == {0: "x", 1: "y", 2: "z"}
    x = torch.randint(0, 66, (2, 24))
    with torch.no_grad():
        assert (theirs(input_ids=x).logits - model(x)[0]).abs().max() < 1e-4
    back = from_pretrained(str(tmp_path / "hf")).eval()
    assert back.labels == ["x", "y", "z"] and torch.allclose(back(x)[0], model(x)[0], atol=1e-5)


# --- training --------------------------------------------------------------------------------------------------------


def test_a_classifier_fine_tunes_from_an_encoder_run_and_resumes_bit_exact(labelled, tmp_path):
    """The encoder pretrained on tiny_char gets a new head for the labels; a run stopped at 3 and resumed to 6 takes
    the uninterrupted run's steps; evaluations log label accuracy; checkpoints record the labels."""
    base = str(tmp_path / "base")
    assert train_encoder(labelled, base, "--max_iters=3", "--block_size=64") == 0
    run = (f"--init_from={base}", "--max_iters=6")
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train_classifier(labelled, whole, *run) == 0
    train_classifier(labelled, parts, f"--init_from={base}", "--max_iters=3")
    train_classifier(labelled, parts, "--init_from=resume", "--max_iters=6")
    assert losses_of(whole) == losses_of(parts) and len(losses_of(whole)) == 6
    evaluations = [r for r in records(whole) if "val_loss" in r]
    assert all(0 <= r["val_accuracy"] <= 1 for r in evaluations)
    meta = read_meta(find_checkpoint(whole))
    assert meta["data"]["classify"]["labels"] == ["exclaim", "plain", "question"]
    assert meta["model_config"]["n_labels"] == 3
    model, _ = load_model(find_checkpoint(whole))
    pretrained, _ = load_model(find_checkpoint(base))
    assert not hasattr(model, "lm_head") and "classifier.out.weight" in model.state_dict()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, pretrained.transformer.h[0].attn.c_attn.weight)


@pytest.mark.slow
def test_two_ranks_train_a_classifier_as_one_process(labelled, tmp_path):
    run = [*ENCODER, f"--data_root={labelled}", "--dataset=labelled", "--block_size=64", "--max_iters=4"]
    run.append("--dtype=float32")
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*run, f"--out_dir={single}"])
    result = torchrun(tmp_path, *run, f"--out_dir={ddp}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    for a, b in zip(records(single), records(ddp), strict=True):
        for key in ("loss", "train_loss", "val_loss", "val_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)


def test_lora_trains_the_adapters_and_the_new_head_and_resumes(labelled, tmp_path):
    base, out = str(tmp_path / "base"), str(tmp_path / "lora")
    train_encoder(labelled, base, "--max_iters=2", "--block_size=64")
    assert train_classifier(labelled, out, f"--init_from={base}", "--max_iters=2", "--lora_rank=2") == 0
    meta = read_meta(find_checkpoint(out))
    model, _ = load_model(find_checkpoint(out))
    head = [name for name, _ in model.named_parameters() if name.startswith("classifier.")]
    assert sorted(meta["lora"]["trainable"]) == sorted(head) and "classifier.out.weight" in head
    first = model.state_dict()["classifier.out.weight"].clone()
    assert train_classifier(labelled, out, "--init_from=resume", "--max_iters=4", "--lora_rank=2") == 0
    model, _ = load_model(find_checkpoint(out))
    assert not torch.equal(model.state_dict()["classifier.out.weight"], first)  # the head trained on


def test_a_classifier_of_other_labels_gets_a_new_head_and_the_wrong_data_is_one_line(labelled, tmp_path):
    out = str(tmp_path / "c")
    train_classifier(labelled, out, "--max_iters=1")
    with pytest.raises(UserError, match="holds a classifier: fine-tune it on labelled texts"):
        train_encoder(labelled, str(tmp_path / "mlm"), f"--init_from={out}", "--max_iters=1")
    with pytest.raises(UserError, match="is a classification dataset: fine-tune an encoder on it"):
        train_classifier(labelled, str(tmp_path / "d"), "--arch=decoder", "--max_iters=1")
    path = tiny_bert_classifier(tmp_path, labels=("a", "b"))  # two labels of its own, a vocabulary of 99 ids
    model = from_pretrained(path)
    model.to_classifier(3, 69)
    assert model.config.n_labels == 3 and model.classifier.out.weight.shape == (3, 32)


# --- using a classifier ----------------------------------------------------------------------------------------------


def test_sample_prints_a_label_for_each_line_as_the_text_classification_pipeline(labelled, tmp_path, capsys):
    out, hf = str(tmp_path / "c"), str(tmp_path / "hf")
    train_classifier(labelled, out, "--max_iters=2", "--norm_position=post", "--bias=True", "--mlp=gelu")
    lines = ["Where is he?", "O, woe the day!", "", "And so he went."]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    sample.main([f"--out_dir={out}", f"--start=FILE:{tmp_path}/lines.txt", "--device=cpu", "--dtype=float32"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(lines) and printed[2] == ""
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf}"])
    pipe = transformers.pipeline("text-classification", model=hf, device="cpu")
    for line, answer in zip(lines, printed, strict=True):
        if line:
            label, p = answer.split("\t")
            theirs = pipe(line)[0]
            assert theirs["label"] == label and abs(theirs["score"] - float(p)) < 1e-3


def test_evaluate_scores_every_text_of_a_split(labelled, tmp_path, capsys):
    out = str(tmp_path / "c")
    train_classifier(labelled, out, "--max_iters=2")
    result = evaluate.main(
        [f"--out_dir={out}", f"--tokens={labelled}/labelled/val.bin", "--device=cpu", "--dtype=float32"]
    )
    model, meta = load_model(find_checkpoint(out))
    model.eval()
    data = load_data(f"{labelled}/labelled", 64)
    special = meta["encoder"]["special"]
    starts, tokens = data.memmap("val", "starts_file"), data.memmap("val")
    texts = [tokens[starts[i] : starts[i + 1]] for i in range(len(starts) - 1)]
    labels = torch.from_numpy(np.array(data.memmap("val", "labels_file")))
    with torch.no_grad():
        logits = model(encoder_rows(texts, special, 64))[0]
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-4)
    with pytest.raises(UserError, match=re.escape("a classifier is scored on labelled texts")):
        evaluate.main([f"--out_dir={out}", f"--text={tmp_path}/none.txt", "--device=cpu"])


# --- a Hugging Face BERT with its own WordPiece tokenizer ------------------------------------------------------------


def tiny_wordpiece_bert(tmp_path) -> str:
    """A random-weight BertForMaskedLM directory with a WordPiece tokenizer.json trained here (lowercasing, as
    bert-base-uncased's), its [PAD], [CLS], [SEP], [MASK] inside its vocabulary: what a user downloads."""
    from conftest import shakespeare_text
    from tokenizers import BertWordPieceTokenizer

    path = tmp_path / "wordpiece-bert"
    path.mkdir()
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(shakespeare_text(50_000).splitlines(), vocab_size=300, special_tokens=special)
    tokenizer.save(str(path / "tokenizer.json"))
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(path)
    return str(path)


def test_a_hugging_face_bert_fine_tunes_on_labels_with_its_own_wordpiece_tokenizer(labelled, tmp_path, capsys):
    bert = tiny_wordpiece_bert(tmp_path)
    source = write_jsonl(tmp_path / "rows.jsonl", labelled_rows())
    prepare_classify.main([f"--input={source}", f"--tokenizer={bert}/tokenizer.json", f"--out={labelled}/wp"])
    data = load_data(f"{labelled}/wp", 32)
    own = {"[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[PAD]": 0}  # the tokenizer's ids, not ids after its vocabulary
    assert special_tokens(data.meta["vocab_size"], data.meta["tokenizer_json"]) == own
    out, hf = str(tmp_path / "out"), str(tmp_path / "hf")
    run = [*ENCODER, f"--data_root={labelled}", "--dataset=wp", f"--out_dir={out}", "--block_size=32"]
    assert train.main([*run, f"--init_from={bert}", "--max_iters=2"]) == 0
    meta = read_meta(find_checkpoint(out))
    assert meta["encoder"]["special"] == own and meta["model_config"]["vocab_size"] == data.meta["vocab_size"]
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--start=What say you?", "--device=cpu", "--dtype=float32"])
    label, p = capsys.readouterr().out.strip().split("\t")
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf}"])
    theirs = transformers.pipeline("text-classification", model=hf, device="cpu")("What say you?")[0]
    assert theirs["label"] == label and abs(theirs["score"] - float(p)) < 1e-3
    capsys.readouterr()
    sample.main([f"--init_from={bert}", "--start=to be or not to [MASK]", "--device=cpu", "--dtype=float32"])
    assert capsys.readouterr().out.startswith("[MASK] 1: ")  # the directory's own [MASK] is found


def test_the_order_recipe_labels_lines_as_written_or_shuffled_and_holds_out_unseen_text(char_data, tmp_path):
    import shakespeare_char_order

    vocabulary, out = f"{char_data}/tiny_char", str(tmp_path / "order")
    shakespeare_char_order.main([f"--vocabulary={vocabulary}", f"--out={out}", "--n_train=40", "--n_val=10"])
    data = load_data(out, 64)
    assert (
        data.classify["labels"] == ["real", "shuffled"] and data.meta["chars"] == load_data(vocabulary, 8).meta["chars"]
    )
    text = open(f"{vocabulary}/input.txt", encoding="utf-8").read()
    cut = int(len(text) * 0.9)
    lines = {line.strip() for line in text.splitlines()}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        rows = [json.loads(line) for line in open(f"{out}/{split}.jsonl", encoding="utf-8")]
        assert {r["label"] for r in rows} == {"real", "shuffled"}
        for r in rows:
            if r["label"] == "real":
                assert r["text"] in part  # validation lines come from the text's last 10%, never trained on
            else:
                assert r["text"] not in lines and any(
                    sorted(r["text"].split()) == sorted(line.split()) for line in lines
                )


def test_attention_telemetry_of_a_classifier_leaves_its_padding_out():
    from engine.attention import attention_weights

    torch.manual_seed(0)
    model = tiny_classifier()
    x = encoder_rows([[1, 2, 3], list(range(1, 20))], {"[CLS]": 66, "[SEP]": 67, "[MASK]": 68, "[PAD]": 69}, 24)
    for weights in attention_weights(model, x):  # what health telemetry's attention entropy reads
        assert (weights * (x == 69)[:, None, None, :]).sum() == 0 and torch.allclose(weights.sum(-1), torch.ones(()))


def test_labels_that_only_look_like_numbers_sort_as_text():
    assert prepare_classify.label_order({"2", "10", "-1"}) == ["-1", "2", "10"]
    assert prepare_classify.label_order({"²", "1"}) == ["1", "²"]  # "²".isdigit(), but int("²") fails
