"""Chat fine-tuning: the template and its mask, prepare/chat.py's files and errors, batches of whole conversations,
the loss as the mean over the assistant tokens of the global batch (by hand, and 2 DDP ranks against one process),
a grown vocabulary, and end to end: a tiny model fine-tuned on 20 made-up questions answers each of its training
questions with its training answer under sample.py --chat=True --temperature=0."""

import dataclasses
import importlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import needs_gpt2_tokenizer, row_layout
from safetensors.torch import load_file
from test_distributed import CONFIG, rank_logs, records, torchrun
from torch.nn import functional as F

import sample
import train
from engine import chat
from engine.checkpoint import find_checkpoint, load_model, read_meta
from engine.data import Tokenizer, chat_rows, get_batch, load_data, target_count, train_key
from engine.errors import UserError
from model import GPT, GPTConfig
from tools import evaluate, export_hf

THINGS = "sky grass sun snow coal rose sea lime plum sand milk ink fire leaf gold rust jade salt wine moss".split()
COLORS = "blue green yellow white black red teal lime purple tan white dark orange green gold brown green white red"
COLORS = COLORS.split() + ["green"]


def conversations() -> list[dict]:
    """20 made-up question/answer conversations, one with a system message."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what color is {t}?"},
                {"role": "assistant", "content": f"{t} is {c}."},
            ]
        }
        for t, c in zip(THINGS, COLORS, strict=True)
    ]
    rows[0]["messages"].insert(0, {"role": "system", "content": "be brief."})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def prepare(tmp_path, rows=None, *extra) -> str:
    """prepare/chat.py on rows (default: the 20 conversations); returns the data root holding dataset "chat"."""
    prepare_chat = importlib.import_module("chat")  # prepare/chat.py, on the tests' path as the prepare scripts are
    source = write_jsonl(tmp_path / "conversations.jsonl", rows or conversations())
    prepare_chat.main([f"--input={source}", f"--out={tmp_path / 'data' / 'chat'}", "--tokenizer=char", *extra])
    return str(tmp_path / "data")


# --- the template ---------------------------------------------------------------------------------------------------


def char_encoder(text: str):
    chars = sorted(set(text))
    return chars, (lambda s: [chars.index(c) for c in s])


def test_render_round_trips_and_the_mask_is_exactly_the_assistant_turns():
    messages = conversations()[0]["messages"] + [
        {"role": "user", "content": "and sea?"},
        {"role": "assistant", "content": "teal."},
    ]
    chars, encode = char_encoder("".join(m["content"] for m in messages))
    special = chat.special_ids(len(chars))
    ids, mask = chat.render(messages, encode, special)
    meta = {"tokenizer": "char", "chars": "".join(chars), "chat": {"template": chat.TEMPLATE, "special": special}}
    tok = Tokenizer(meta)
    assert tok.vocab_size == len(chars) + 4
    expected = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    assert tok.decode(ids) == expected
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "sky is blue.<|end|>teal.<|end|>"
    prompt, _ = chat.render(messages[:2], encode, special, reply=True)
    assert tok.decode(prompt).endswith("<|user|>what color is sky?<|end|><|assistant|>")


@needs_gpt2_tokenizer
def test_gpt2_chat_tokens_come_after_its_vocabulary_and_text_never_spells_them():
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    special = chat.special_ids(enc.n_vocab)
    assert list(special.values()) == [50257, 50258, 50259, 50260]
    ids, _ = chat.render(
        [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "no"}],
        enc.encode_ordinary,
        special,
    )
    assert ids.count(special["<|end|>"]) == 2  # the literal text in the message is text, not the token


def test_crop_drops_whole_old_turns_and_keeps_the_system_message():
    chars, encode = char_encoder("abcdefghijklmnopqrstuvwxyz ?.")
    special = chat.special_ids(len(chars))
    messages = [{"role": "system", "content": "be brief."}]
    for q in ("aaaa", "bbbb", "cccc"):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper().lower()}]
    messages.append({"role": "user", "content": "dddd"})
    full, dropped = chat.prompt_ids(messages, encode, special, max_len=1000)
    assert dropped == 0
    ids, dropped = chat.prompt_ids(messages, encode, special, max_len=len(full) - 1)
    assert dropped == 2  # one whole user + assistant turn
    kept = [messages[0], *messages[3:]]
    assert ids == chat.render(kept, encode, special, reply=True)[0]


# --- prepare/chat.py ------------------------------------------------------------------------------------------------


def test_prepare_writes_tokens_mask_and_starts_that_load(tmp_path):
    root = prepare(tmp_path, None, "--val_fraction=0.1")
    data = load_data(os.path.join(root, "chat"), block_size=64)
    assert data.chat["template"] == chat.TEMPLATE
    assert data.meta["splits"]["train"]["documents"] == 18 and data.meta["splits"]["val"]["documents"] == 2
    tok = Tokenizer(data.meta)
    tokens = np.fromfile(data.split_path("train"), dtype=data.dtype)
    mask = np.fromfile(data.split_path("train", "mask_file"), dtype=np.uint8)
    starts = np.fromfile(data.split_path("train", "starts_file"), dtype=np.int64)
    texts = [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    rendered = {"".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in r["messages"]) for r in conversations()}
    assert set(texts) <= rendered and len(set(texts)) == 18
    learned = tok.decode(tokens[mask == 1].tolist())
    assert learned.count("<|end|>") == 18 and "what color" not in learned


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "row 3 of .*: no messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "row 3 of .*: message 1 has role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "message 2 .*no con",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 3 of .*: no assistant message"),
        ("{not json", "conversations.jsonl:3: not valid JSON"),
    ],
)
def test_a_bad_row_is_named_in_one_line(tmp_path, capsys, row, message):
    rows = conversations()[:2] + [row]
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path, rows)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_long_conversations_are_truncated_dropped_or_refused(tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a" * 200}]}
    rows = [*conversations(), long]
    for name in "tde":
        (tmp_path / name).mkdir()
    root = prepare(tmp_path / "t", rows, "--block_size=64")
    data = load_data(os.path.join(root, "chat"), block_size=64)
    assert max(np.diff(np.fromfile(data.split_path(s, "starts_file"), np.int64)).max() for s in ("train", "val")) == 64
    prepare(tmp_path / "d", rows, "--block_size=64", "--on_long=drop")
    assert "0 conversation(s) truncated and 1 dropped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare(tmp_path / "e", rows, "--block_size=64", "--on_long=error")
    err = capsys.readouterr().err
    assert "row 21 of" in err and "longer than --block_size=64" in err


# --- batches and the loss -------------------------------------------------------------------------------------------


def test_a_batch_is_whole_conversations_with_only_assistant_targets(tmp_path):
    data = load_data(os.path.join(prepare(tmp_path), "chat"), block_size=48)
    tok = Tokenizer(data.meta)
    x, y = get_batch(data, "train", 6, 48, train_key(1, 0, 0), "cpu")
    assert x.shape == y.shape == (6, 48)
    begin = {tok.special["<|user|>"], tok.special["<|system|>"]}
    assert all(int(row[0]) in begin for row in x)  # every row starts at a conversation's first token
    for row_x, row_y in zip(x, y, strict=True):
        kept = row_y[row_y >= 0].tolist()
        assert tok.decode(kept).endswith("<|end|>") and "what color" not in tok.decode(kept)
        # where a target is kept it is the next input token
        idx = torch.nonzero(row_y[:-1] >= 0).flatten()
        assert torch.equal(row_y[idx], row_x[idx + 1])
    assert target_count(data, "train", 6, 48, train_key(1, 0, 0)) == int((y >= 0).sum())


def test_the_step_loss_is_the_mean_over_the_assistant_tokens_of_the_global_batch(tmp_path):
    root = prepare(tmp_path)
    out = tmp_path / "out"
    args = [f"--data_root={root}", "--dataset=chat", f"--out_dir={out}", *CONFIG, "--block_size=48"]
    train.main([*args, "--gradient_accumulation_steps=2", "--max_iters=1", "--eval_interval=1"])
    logged = next(r["loss"] for r in records(out) if "loss" in r)
    # by hand: the same initial model on the same two micro-batches, every kept target weighing the same
    torch.manual_seed(1337)
    data = load_data(os.path.join(root, "chat"), block_size=48)
    cfg = train.parse_config(train.TrainConfig, [*args, "--gradient_accumulation_steps=2"])
    model = GPT(GPTConfig.from_options(dataclasses.asdict(cfg), data.meta["vocab_size"])).eval()
    xs, ys = zip(*(chat_rows(data, "train", 4, 48, train_key(cfg.seed, 0, m)) for m in range(2)), strict=True)
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    logits, _ = model(x, all_logits=True)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    per_micro = [model(torch.from_numpy(a), torch.from_numpy(b))[1].item() for a, b in zip(xs, ys, strict=True)]
    assert abs(np.mean(per_micro) - expected) > 1e-4  # the mean of micro-batch means would be another number


def test_a_micro_batch_without_targets_adds_nothing_instead_of_nan(tiny_config):
    model = GPT(tiny_config)
    x = torch.zeros(2, 8, dtype=torch.long)
    _, loss = model(x, torch.full((2, 8), -1), reduction="sum")
    assert loss.item() == 0.0


@pytest.mark.slow
def test_two_ranks_match_one_process_on_chat_data(tmp_path):
    root = prepare(tmp_path)
    args = [f"--data_root={root}", "--dataset=chat", "--gradient_accumulation_steps=2", *CONFIG, "--block_size=48"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*args, f"--out_dir={single}"])
    result = torchrun(tmp_path, *args, f"--out_dir={ddp}")
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr"))
    ours, theirs = records(single), records(ddp)
    assert row_layout(ours) == row_layout(theirs)  # the same rows in the same order, then their losses kind by kind
    for key in ("loss", "val_loss"):
        a, b = [r[key] for r in ours if key in r], [r[key] for r in theirs if key in r]
        assert None not in a + b, (key, a, b)  # a non-finite loss is written as null
        assert a == pytest.approx(b, rel=1e-5), key


# --- a grown vocabulary ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_grown_vocabulary_keeps_old_logits_and_starts_new_rows_at_the_mean(tie):
    model = GPT(GPTConfig(block_size=8, vocab_size=60, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tie)).eval()
    x = torch.randint(60, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(x, all_logits=True)[0]
    mean = model.transformer.wte.weight.mean(0).detach().clone()
    model.grow_vocab(64)
    after = model(x, all_logits=True)[0]
    assert after.shape[-1] == 64 and torch.allclose(after[..., :60], before, atol=1e-6)
    assert torch.allclose(model.transformer.wte.weight[60:], mean.expand(4, -1))
    assert (model.transformer.wte.weight is model.lm_head.weight) == tie
    assert model(torch.tensor([[62]]))[0].shape == (1, 1, 64)


# --- end to end -----------------------------------------------------------------------------------------------------


def chat_with(out_dir, lines: list[str], monkeypatch, capsys, *extra) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    sample.main(
        [f"--out_dir={out_dir}", "--chat=True", "--temperature=0", "--device=cpu", "--max_new_tokens=30", *extra]
    )
    return capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_fine_tuned_on_twenty_questions_it_answers_each_as_trained(tmp_path, monkeypatch, capsys):
    root = prepare(tmp_path, None, "--val_fraction=0.05")
    out = tmp_path / "out"
    train.main(
        [f"--data_root={root}", "--dataset=chat", f"--out_dir={out}", "--device=cpu", "--compile=False"]
        + ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=48", "--batch_size=16", "--dropout=0.0"]
        + ["--gradient_accumulation_steps=1", "--max_iters=300", "--eval_interval=300", "--eval_iters=2"]
        + ["--learning_rate=3e-3", "--warmup_iters=20", "--log_interval=100"]
        + ["--dtype=float32"]  # the precision evaluate.py scores in on CPUs, compared below
    )
    capsys.readouterr()
    data = load_data(os.path.join(root, "chat"), block_size=48)
    tok = Tokenizer(data.meta)
    tokens = np.fromfile(data.split_path("train"), dtype=data.dtype)
    trained = [t for t in THINGS if f"what color is {t}?" in tok.decode(tokens.tolist())]
    assert len(trained) == 19
    answers = dict(zip(THINGS, COLORS, strict=True))
    # one conversation per question (each answer is the whole reply), and then one conversation of three turns
    for thing in trained:
        system = ["--system=be brief."] if thing == THINGS[0] else []  # as that conversation was trained
        reply = chat_with(out, [f"what color is {thing}?"], monkeypatch, capsys, *system)
        assert reply == [f"{thing} is {answers[thing]}."]
    replies = chat_with(out, [f"what color is {t}?" for t in trained[1:4]], monkeypatch, capsys)
    assert replies == [f"{t} is {answers[t]}." for t in trained[1:4]]
    # the evaluation of the masked loss reproduces training's own val loss
    evaluate.main([f"--out_dir={out}", f"--tokens={data.split_path('val')}", "--device=cpu"])
    val_loss = float(capsys.readouterr().out.split("loss ")[1].split()[0])
    assert val_loss == pytest.approx(read_meta(find_checkpoint(out))["val_loss"], rel=1e-4)
    # exported, transformers renders the template to the same ids and its pipeline answers the same
    transformers = pytest.importorskip("transformers")
    hf_dir = str(tmp_path / "hf")
    export_hf.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"])
    messages = [{"role": "user", "content": f"what color is {trained[1]}?"}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert hf_ids == chat.render(messages, tok.encode, tok.special, reply=True)[0]
    pipe = transformers.pipeline("text-generation", model=hf_dir)
    answer = pipe(messages, do_sample=False, max_new_tokens=30)[0]["generated_text"][-1]
    assert answer == {"role": "assistant", "content": f"{trained[1]} is {answers[trained[1]]}."}


def test_chat_on_a_model_without_a_template_is_one_line(char_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.main([f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG, "--max_iters=1"])
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    with pytest.raises(UserError, match="not trained on chat data"):
        sample.main([f"--out_dir={out}", "--chat=True", "--device=cpu"])


def test_a_parquet_file_reads_through_datasets_like_a_hub_dataset(tmp_path):
    # the hub path (datasets.load_dataset by name) needs the network; a local parquet file takes the same code
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "conversations.parquet"
    pq.write_table(pa.Table.from_pylist(conversations()), path)
    out = tmp_path / "data" / "chat"
    importlib.import_module("chat").main([f"--input={path}", f"--out={out}", "--tokenizer=char"])
    meta = load_data(str(out), block_size=64).meta
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 20


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") == "1", reason="a hub dataset needs the network")
def test_a_hub_chat_dataset(tmp_path):
    out = tmp_path / "data" / "smoltalk"
    args = ["--input=HuggingFaceTB/smoltalk", "--config=everyday-conversations", f"--out={out}", "--tokenizer=char"]
    try:
        importlib.import_module("chat").main([*args, f"--cache_dir={tmp_path / 'cache'}"])
    except SystemExit as e:
        pytest.skip(f"the hub is not reachable here ({e})")
    assert load_data(str(out), block_size=1024).chat["template"] == chat.TEMPLATE


@needs_gpt2_tokenizer
def test_a_gpt2_from_hugging_face_grows_its_vocabulary_for_the_chat_tokens(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    hf_dir = tmp_path / "gpt2-tiny"
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    source = write_jsonl(tmp_path / "c.jsonl", conversations())
    importlib.import_module("chat").main([f"--input={source}", f"--out={tmp_path / 'data' / 'chat'}"])
    out = tmp_path / "out"
    train.main(
        [f"--data_root={tmp_path / 'data'}", "--dataset=chat", f"--out_dir={out}", f"--init_from={hf_dir}", *CONFIG]
        + ["--block_size=32", "--max_iters=2", "--eval_interval=2", "--lora_rank=2"]
    )
    assert "vocabulary grown from 50257 to 50304 for the chat tokens" in capsys.readouterr().out
    model, meta = load_model(find_checkpoint(out))
    assert model.config.vocab_size == 50304 and meta["data"]["chat"]["special"]["<|end|>"] == 50260
    assert meta["lora"]["new_rows_from"] == 50257  # the chat tokens' rows train, not the whole matrix
    trained = load_file(os.path.join(find_checkpoint(out), "model.safetensors"))
    assert tuple(trained["transformer.wte.rows"].shape) == (50304 - 50257, 16)
