"""<|endoftext|> written in text is text, on every path (issue 26, item 9).

The rule, as tiktoken's encode_ordinary and nanoGPT have it: text from a user or a dataset (a document, a chat
message, a prompt) encodes as ordinary text, so the literal string "<|endoftext|>" in it becomes its ordinary BPE
pieces, never the special id. Only our code inserts special ids: the boundary prepare appends after each document,
the start of an empty prompt, the chat template's own tokens. Checked on prepare/text.py (gpt2, a trained BPE,
char), prepare/chat.py, sample.py's Tokenizer.encode and the Hugging Face export (AutoTokenizer and its chat
template), each against tiktoken's encode_ordinary or a tokenizer that has no special tokens at all.
"""

import importlib
import json
import os

import numpy as np
import pytest
import text
from conftest import needs_gpt2_tokenizer

from engine import chat
from engine.data import Tokenizer, load_data
from engine.tokenization import ENDOFTEXT, bpe_tokenizer_json, load_encoding, specials_as_text, train_bpe

WORDS = "the cat sat on a mat and said so to the dog".split()


def documents(n: int = 30) -> list[str]:
    """n distinct documents, each with the literal <|endoftext|> somewhere: after a space, glued, leading, trailing,
    twice."""
    forms = ["{a} {e} {b}", "{a}{e}{b}", "{e}{a} {b}", "{a} {b}{e}", "{a} {e}{e} {b}", "{e} {a}\n{e}\n{b}"]
    docs = []
    for i in range(n):
        a, b = " ".join(WORDS[i % 5 : i % 5 + 4]), " ".join(WORDS[i % 7 : i % 7 + 3])
        docs.append(f"{i}: " + forms[i % len(forms)].format(a=a, b=b, e=ENDOFTEXT))
    return docs


def prepare_text(tmp_path, tokenizer: str) -> tuple[str, dict]:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()), encoding="utf-8")
    out = tmp_path / "data" / tokenizer
    meta = text.main(
        [f"--input={path}", f"--out={out}", f"--tokenizer={tokenizer}", "--bpe_vocab_size=300", "--num_proc=1"]
        + [f"--cache_dir={tmp_path / 'cache'}", "--val_fraction=0.2"]
    )
    return str(out), meta


def split_documents(out: str, meta: dict) -> list[tuple[int, ...]]:
    """Every document's ids in the dataset, the appended end-of-text id cut off; asserts there is one per document."""
    eot, docs = meta["eot_id"], []
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"]).tolist()
        assert ids.count(eot) == meta["splits"][split]["documents"], f"{split}: an end-of-text id inside a document"
        assert ids[-1] == eot
        cuts = [-1] + [i for i, t in enumerate(ids) if t == eot]
        docs += [tuple(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert len(docs) == len(documents())
    return docs


def without_added_tokens(tokenizer):
    """The same tokenizer with no added tokens at all: what "ordinary text" means for a `tokenizers` file."""
    from tokenizers import Tokenizer as HF

    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = []
    return HF.from_str(json.dumps(spec))


# --- the method: the `tokenizers` library encodes special-token strings as text -------------------------------------


def test_a_trained_bpe_encodes_the_literal_as_if_it_had_no_special_tokens():
    tokenizer = train_bpe(documents(), 300)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    assert eot in tokenizer.encode(documents()[0], add_special_tokens=False).ids  # the library's default matches it
    reference = without_added_tokens(tokenizer)
    plain = specials_as_text(tokenizer)
    for doc in [*documents(), ENDOFTEXT, f"a{ENDOFTEXT}", f" {ENDOFTEXT} "]:
        ids = plain.encode(doc, add_special_tokens=False).ids
        assert ids == reference.encode(doc, add_special_tokens=False).ids and eot not in ids
        assert plain.decode(ids) == doc
    batch = [e.ids for e in plain.encode_batch(documents(), add_special_tokens=False)]
    assert batch == [reference.encode(d, add_special_tokens=False).ids for d in documents()]


@needs_gpt2_tokenizer
def test_gpt2_as_a_tokenizers_file_encodes_the_literal_as_tiktoken_encode_ordinary_does():
    enc = load_encoding("gpt2")
    plain = specials_as_text(bpe_tokenizer_json(enc))
    for doc in [*documents(), ENDOFTEXT]:
        assert plain.encode(doc, add_special_tokens=False).ids == enc.encode_ordinary(doc)


# --- every path: prepare, sample's encode, the export -----------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [pytest.param("gpt2", marks=needs_gpt2_tokenizer), "bpe", "char"])
def test_prepare_text_appends_the_only_end_of_text_id_and_sample_encodes_documents_the_same(tmp_path, tokenizer):
    out, meta = prepare_text(tmp_path, tokenizer)
    tok = Tokenizer(load_data(out, block_size=8).meta)  # sample.py's (and evaluate.py's) encoder
    if tokenizer == "char":  # no end-of-text token: the literal is 13 characters
        assert meta["eot_id"] is None and tok.encode(ENDOFTEXT) == [meta["chars"].index(c) for c in ENDOFTEXT]
        ids = np.fromfile(os.path.join(out, "train.bin"), dtype=meta["dtype"]).tolist()
        assert tok.decode(ids).count(ENDOFTEXT) > 0
        return
    encoded = {tuple(tok.encode(d)): d for d in documents()}
    for ids in split_documents(out, meta):  # eot count == documents, and each document is sample's encoding
        assert ids in encoded and meta["eot_id"] not in ids
    if tokenizer == "gpt2":
        enc = load_encoding("gpt2")
        assert sorted(encoded) == sorted(tuple(enc.encode_ordinary(d)) for d in documents())
        assert tok.encode(ENDOFTEXT) == enc.encode_ordinary(ENDOFTEXT) == [27, 91, 437, 1659, 5239, 91, 29]


def test_each_tokenizing_process_encodes_the_literal_as_text_too(tmp_path):
    """With num_proc > 1, datasets pickles the encoder (with dill) into each process: the `tokenizers` setting is not
    pickled, so the copy must set it again."""
    import datasets
    import dill

    train = datasets.Dataset.from_dict({"text": documents()})
    args = text.parse_args([f"--input={tmp_path}", f"--out={tmp_path / 'out'}", "--tokenizer=bpe"])
    args.bpe_vocab_size = 300
    encode_batch, info = text.make_tokenizer(args, train)
    copy = dill.loads(dill.dumps(encode_batch, recurse=True))
    assert [ids.tolist() for ids in copy(documents())] == [ids.tolist() for ids in encode_batch(documents())]
    assert all(ids.tolist().count(info["eot_id"]) == 1 for ids in copy(documents()))


def conversations() -> list[dict]:
    docs = documents(8)
    return [
        {"messages": [{"role": "user", "content": docs[i]}, {"role": "assistant", "content": docs[i + 1]}]}
        for i in range(0, len(docs), 2)
    ]


def prepare_chat(tmp_path, tokenizer: str) -> tuple[str, dict]:
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations()), encoding="utf-8")
    out = tmp_path / "data" / f"chat_{tokenizer}"
    meta = importlib.import_module("chat").main([f"--input={path}", f"--out={out}", f"--tokenizer={tokenizer}"])
    return str(out), meta


@pytest.mark.parametrize("tokenizer", [pytest.param("gpt2", marks=needs_gpt2_tokenizer), "char"])
def test_prepare_chat_and_sample_chat_render_a_literal_in_a_message_alike(tmp_path, tokenizer):
    out, meta = prepare_chat(tmp_path, tokenizer)
    tok = Tokenizer(load_data(out, block_size=8).meta)
    special = meta["chat"]["special"]
    trained = set()
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"]).tolist()
        starts = np.fromfile(os.path.join(out, f"{split}.starts.bin"), dtype=np.int64).tolist()
        trained |= {tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)}
        if meta["eot_id"] is not None:
            assert meta["eot_id"] not in ids
    # sample.py --chat renders a conversation with the dataset's Tokenizer.encode: the very ids training saw
    sampled = {tuple(chat.render(c["messages"], tok.encode, tok.special)[0]) for c in conversations()}
    assert sampled == trained
    if tokenizer == "gpt2":
        enc = load_encoding("gpt2")
        message = conversations()[0]["messages"][:1]
        ids, _ = chat.prompt_ids(message, tok.encode, tok.special, 1024)  # what sample.py --chat feeds the model
        body = enc.encode_ordinary(message[0]["content"])
        assert ids == [special["<|user|>"], *body, special[chat.END], special["<|assistant|>"]]


def export(tmp_path, meta: dict, chatting: bool) -> str:
    """The tokenizer files tools/export_hf.py writes for `meta`'s data, beside a tiny model."""
    from engine.hf_interop import save_hf
    from model import GPT, GPTConfig
    from tools.export_hf import hf_tokenizer

    tokenizer, vocab = hf_tokenizer(meta, None)
    config = GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True)
    eos = meta["chat"]["special"][chat.END] if chatting else meta["eot_id"]
    hf_dir = str(tmp_path / "hf")
    save_hf(GPT(config), hf_dir, eos, tokenizer, vocab, chat.jinja_template() if chatting else None)
    return hf_dir


@pytest.mark.parametrize("tokenizer", [pytest.param("gpt2", marks=needs_gpt2_tokenizer), "bpe"])
def test_an_exported_tokenizer_encodes_the_literal_as_text(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    out, _ = prepare_text(tmp_path, tokenizer)
    meta = load_data(out, block_size=8).meta
    hf_dir = export(tmp_path, meta, chatting=False)
    ours = Tokenizer(meta)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    reread = Tokenizer({"tokenizer": "tokenizer.json", "path": os.path.join(hf_dir, "tokenizer.json")})  # --init_from
    for doc in documents():
        assert theirs(doc)["input_ids"] == ours.encode(doc) == reread.encode(doc)
        assert meta["eot_id"] not in ours.encode(doc)
    assert theirs.eos_token_id == reread.eot_id == meta["eot_id"]  # the id itself is still there, for our code
    assert theirs.decode([meta["eot_id"]]) == ENDOFTEXT


@needs_gpt2_tokenizer
def test_the_exported_chat_template_renders_a_literal_in_a_message_as_training_did(tmp_path):
    transformers = pytest.importorskip("transformers")
    out, meta = prepare_chat(tmp_path, "gpt2")
    hf_dir = export(tmp_path, meta, chatting=True)
    tok = Tokenizer(load_data(out, block_size=8).meta)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for conv in conversations():
        for messages, reply in ((conv["messages"], False), (conv["messages"][:1], True)):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=reply)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ids == chat.render(messages, tok.encode, tok.special, reply=reply)[0]
            assert meta["eot_id"] not in ids
