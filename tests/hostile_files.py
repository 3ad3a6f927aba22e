"""Hostile variants of every file this code reads from outside, and the harness that feeds each to its real reader.

Shared by tests/test_untrusted_files.py (a few hundred seeded examples per reader, in the suite) and
bench/fuzz_readers.py (as many as you like, by hand). A reader here is the function an entry script calls on the
file: load_data for a dataset's meta.json, load_model and load_state for a checkpoint's meta.json and state.pt,
from_pretrained for a Hugging Face config.json, Tokenizer for a tokenizer.json, read_items for task files,
import_checkpoint and import_dataset for nanoGPT's ckpt.pt and meta.pkl.

Each example copies a small valid world (built once) into a fresh directory, replaces the reader's file with a
hostile variant (a valid file mutated: wrong types, negative or huge sizes, missing and extra keys, non-finite
numbers, out-of-range ids, paths that lead elsewhere, deep nesting; or bytes that do not parse at all), runs the
reader there, and reports a failure when the reader
  - raised anything but a UserError (a Rust panic, a KeyError, a RuntimeError from torch), or printed a Rust panic,
  - refused in more than one line, or without naming the directory the file is in,
  - changed a file or a directory while refusing, or
  - accepted a file whose result then breaks in use (a forward pass, a batch, decoding: the oracle of "it is valid").
"""

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from engine.errors import UserError

# Hypothesis keeps caches (unicode tables, constants mined from our modules) in ./.hypothesis by default: under the
# system's temporary directory instead, so a run writes nothing into the working tree.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hypothesis-untrusted-files"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (ROOT, os.path.join(ROOT, "prepare")):  # as pytest's pythonpath, for bench/fuzz_readers.py
    if folder not in sys.path:
        sys.path.insert(0, folder)

CHARS = "abcdefgh "


@dataclass
class Reader:
    name: str
    template: str  # the world's directory this reader's example copies
    file: str  # the hostile file, relative to that directory
    kind: str  # how the file is written: json, jsonl, torch or pickle
    read: Callable[[str], Any]  # runs the reader in the copied directory, returns what it loaded
    use: Callable[[Any], None]  # puts what was loaded to use: must not break on anything the reader accepted
    writes: bool = False  # the reader writes when it accepts (an import)


# --- the valid world -------------------------------------------------------------------------------------------------


def build_world(root: str) -> dict[str, str]:
    """Write one small valid instance of every untrusted file under `root`; returns template name -> directory."""
    from engine import chat
    from engine.checkpoint import save_checkpoint, save_lora_base
    from engine.ema import EMA
    from engine.fsdp import optimizer_state
    from engine.hf_interop import save_hf
    from engine.lora import add_lora
    from engine.tokenization import char_tokenizer_json, chars_hash, train_bpe
    from model import GPT, GPTConfig

    worlds = {
        name: os.path.join(root, name)
        for name in ("dataset", "labelled", "run", "hf_gpt2", "hf_llama", "hf_bert", "hf_classifier", "files", "nano")
    }
    for directory in worlds.values():
        os.makedirs(directory)

    # a chat dataset over a character vocabulary (every entry of a dataset's meta.json is there)
    special = chat.special_ids(len(CHARS))
    vocab = len(CHARS) + len(special)
    chat_meta = {"template": chat.TEMPLATE, "special": special}
    _write_dataset(os.path.join(worlds["dataset"], "data", "tiny"), vocab, chat_meta)
    _write_labelled(os.path.join(worlds["labelled"], "data", "tiny"))

    # a LoRA run on that data with a weight average: meta.json with lora and chat, state.pt with ema
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=vocab, n_layer=1, n_head=2, n_embd=8, bias=False)
    model = GPT(config)
    out = os.path.join(worlds["run"], "out")
    lora = {"rank": 2, "alpha": 4.0, "targets": ["attn"], "trainable": [], "new_rows_from": len(CHARS)}
    lora |= {"base_from": "scratch"} | save_lora_base(out, model)
    add_lora(model, 2, 4.0, ("attn",), new_rows_from=len(CHARS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t for n, t in model.state_dict().items() if n in trained}
    state = {"optimizers": [optimizer_state(model, optimizer, False)], "scaler": {}, "iter_num": 3}
    state |= {"best_val_loss": 2.0, "tokens": 96, "progress": 3.0, "skipped_steps": 0, "rollbacks": 0}
    state |= {"lr_scale": 1.0, "recent_losses": [2.5, 2.4], "bad_steps": 0, "clipped_steps": 1}
    state |= {"ema": EMA(model, 0.9).state_dict()}
    data = {"tokenizer": "char", "tokenizer_hash": chars_hash(CHARS), "vocab_size": vocab, "dtype": "uint16"}
    data |= {"eot_id": None, "chars": CHARS, "chat": chat_meta, "source": "test", "tokenizer_json": None}
    train_config = {"batch_size": 2, "gradient_accumulation_steps": 1, "block_size": 8, "dataset": "tiny"}
    meta = {"model_config": dataclasses.asdict(config), "train_config": train_config, "data": data}
    meta |= {"code_version": None, "val_loss": 2.0, "train_loss": 2.1, "rollbacks": 0, "lora": lora}
    save_checkpoint(out, 3, weights, state, meta)

    # Hugging Face directories in each layout
    save_hf(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)), worlds["hf_gpt2"])
    llama = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8, pos_embedding="rope")
    llama.norm, llama.mlp, llama.mlp_hidden, llama.tie_embeddings, llama.bias = "rmsnorm", "swiglu", 16, False, False
    save_hf(GPT(llama), worlds["hf_llama"])
    bert = GPTConfig(arch="encoder", block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8, norm_position="post")
    save_hf(GPT(bert), worlds["hf_bert"])
    classifier = GPT(bert)
    classifier.to_classifier(3, 9)
    save_hf(classifier, worlds["hf_classifier"], labels=["no", "yes", "maybe"])

    # a trained BPE's tokenizer.json, a character one, and the two task files
    files = worlds["files"]
    bpe = train_bpe([f"the king {i} and the queen, naive cafe {i * 7}" for i in range(40)], 300)
    bpe.save(os.path.join(files, "bpe.json"))
    char_tokenizer_json(CHARS).save(os.path.join(files, "char.json"))
    with open(os.path.join(files, "choice.jsonl"), "w") as f:
        for i in range(3):
            f.write(json.dumps({"context": f"a b {i}", "choices": ["ab", "ba", "h"], "label": i}) + "\n")
    with open(os.path.join(files, "hellaswag.jsonl"), "w") as f:
        row = {"activity_label": "Cake", "ctx_a": "a b.", "ctx_b": "c", "endings": ["d [title] e", "f"], "label": "1"}
        for i in range(2):
            f.write(json.dumps(row | {"ind": i}) + "\n")

    # nanoGPT: a character dataset (meta.pkl), and a ckpt.pt trained on it
    nano_data = os.path.join(worlds["nano"], "data", "nano")
    os.makedirs(nano_data)
    ids = torch.arange(200) % len(CHARS)
    ids.numpy().astype("uint16").tofile(os.path.join(nano_data, "train.bin"))
    ids[:50].numpy().astype("uint16").tofile(os.path.join(nano_data, "val.bin"))
    itos = dict(enumerate(CHARS))
    with open(os.path.join(nano_data, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    args = {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8, "bias": False, "vocab_size": len(CHARS)}
    nano = GPT(GPTConfig(**args, mlp="gelu"))
    adam = torch.optim.AdamW(nano.parameters(), lr=1e-3)
    nano(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    adam.step()
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in nano.state_dict().items()}, "optimizer": adam.state_dict()}
    ckpt |= {"model_args": args | {"dropout": 0.0}, "iter_num": 5, "best_val_loss": torch.tensor(2.5)}
    ckpt |= {"config": {"dataset": "nano", "batch_size": 4, "learning_rate": 1e-3, "beta2": 0.99}}
    torch.save(ckpt, os.path.join(worlds["nano"], "ckpt.pt"))
    return worlds


def _write_dataset(directory: str, vocab: int, chat_meta: dict) -> None:
    """A chat dataset as prepare/chat.py writes it: 4 conversations per split, their masks and starts."""
    import numpy as np

    from engine.tokenization import chars_hash

    os.makedirs(directory)
    splits = {}
    for split in ("train", "val"):
        ids, mask, starts = [], [], [0]
        for c in range(4):
            conv = [chat_meta["special"]["<|user|>"], c % 8, 1, chat_meta["special"]["<|end|>"]]
            conv += [chat_meta["special"]["<|assistant|>"], 2, 3, chat_meta["special"]["<|end|>"]]
            ids += conv
            mask += [0, 0, 0, 0, 0, 1, 1, 1]
            starts.append(len(ids))
        arrays = {"file": np.array(ids, np.uint16), "mask_file": np.array(mask, np.uint8)}
        arrays["starts_file"] = np.array(starts, np.int64)
        entry = {"tokens": len(ids), "documents": 4, "trained_tokens": sum(mask)}
        for part, name in (("file", f"{split}.bin"), ("mask_file", f"{split}.mask.bin")):
            entry[part] = name
        entry["starts_file"] = f"{split}.starts.bin"
        for part, array in arrays.items():
            array.tofile(os.path.join(directory, entry[part]))
            digest = hashlib.sha256(array.tobytes()).hexdigest()
            entry[{"file": "sha256", "mask_file": "mask_sha256", "starts_file": "starts_sha256"}[part]] = digest
        splits[split] = entry
    meta = {"format": "nanogpt-tokens/1", "tokenizer": "char", "tokenizer_hash": chars_hash(CHARS)}
    meta |= {"vocab_size": vocab, "eot_id": None, "chars": CHARS, "chat": chat_meta, "dtype": "uint16"}
    meta |= {"source": "test", "splits": splits}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


# --- the readers -----------------------------------------------------------------------------------------------------


def _checkpoint(directory: str) -> str:
    out = os.path.join(directory, "out")
    return os.path.join(out, next(n for n in sorted(os.listdir(out)) if n.startswith("ckpt-")))


def _write_labelled(directory: str) -> None:
    """A classification dataset as prepare/classify.py writes it: 3 texts per split, their starts and labels."""
    import numpy as np

    from engine.tokenization import chars_hash

    os.makedirs(directory)
    splits = {}
    for split in ("train", "val"):
        arrays = {"file": np.array([1, 2, 3, 4, 5, 6, 7], np.uint16), "starts_file": np.array([0, 2, 5, 7], np.int64)}
        arrays["labels_file"] = np.array([0, 2, 1], np.int64)
        entry = {"tokens": 7, "documents": 3}
        for part, array in arrays.items():
            entry[part] = f"{split}.bin" if part == "file" else f"{split}.{part.removesuffix('_file')}.bin"
            array.tofile(os.path.join(directory, entry[part]))
            digest = hashlib.sha256(array.tobytes()).hexdigest()
            entry[{"file": "sha256", "starts_file": "starts_sha256", "labels_file": "labels_sha256"}[part]] = digest
        splits[split] = entry
    meta = {"format": "nanogpt-tokens/1", "tokenizer": "char", "tokenizer_hash": chars_hash(CHARS)}
    meta |= {"vocab_size": len(CHARS), "eot_id": None, "chars": CHARS, "dtype": "uint16", "source": "test"}
    meta |= {"classify": {"labels": ["no", "yes", "maybe"]}, "splits": splits}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def _use_labelled(data) -> None:
    from engine.batch_schedule import batch_objective

    labelled = batch_objective("encoder", data, 0.15)
    for split in ("train", "val"):
        x, y = labelled.batch(data, split, 2, 8, (0, 0, 1, 2), "cpu")
        assert (y >= 0).all() and (y < len(data.classify["labels"])).all()
    data.close()


def _read_dataset(directory: str):
    from engine.data import load_data

    return load_data(os.path.join(directory, "data", "tiny"), block_size=8)


def _use_dataset(data) -> None:
    from engine.data import Tokenizer, first_targets, get_batch, target_count

    tokenizer = Tokenizer(data.meta)
    for split in ("train", "val"):
        x, y = get_batch(data, split, 2, 8, (0, 0, 1, 2), "cpu")
        tokenizer.decode(x[0].tolist())
        target_count(data, split, 2, 8, (0, 0, 1, 2))
        if data.chat:
            first_targets(data, split)
    data.close()


def _read_checkpoint(directory: str):
    from engine.checkpoint import load_model

    return load_model(_checkpoint(directory))


def _use_model(loaded) -> None:
    from engine.data import Tokenizer
    from engine.lora import merge_lora

    model, meta = loaded
    merge_lora(model)
    model.eval()(torch.zeros(1, min(4, model.config.block_size), dtype=torch.long))
    tokenizer = Tokenizer(meta["data"])
    tokenizer.decode(list(range(min(tokenizer.vocab_size, model.config.vocab_size))))


def _read_state(directory: str):
    from engine.checkpoint import load_model, load_state

    load_state(_checkpoint(directory))
    return load_model(_checkpoint(directory), weights="ema")


def _read_hf(directory: str):
    from engine.hf_interop import from_pretrained

    return from_pretrained(directory)


def _use_hf(model) -> None:
    model.eval()(torch.zeros(1, min(4, model.config.block_size), dtype=torch.long))


def _read_tokenizer(file: str) -> Callable[[str], Any]:
    def read(directory: str):
        from engine.data import Tokenizer

        return Tokenizer({"tokenizer": "tokenizer.json", "path": os.path.join(directory, file)})

    return read


def _use_tokenizer(tokenizer) -> None:
    for text in ("the king and the queen", "hello\n\n  world <|endoftext|> ☃ 123", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"):
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids), f"id outside the vocabulary of {tokenizer.vocab_size}"
        tokenizer.decode(ids)
        for i in ids[:3]:
            tokenizer.token_bytes(i)


def _read_task(task: str) -> Callable[[str], Any]:
    def read(directory: str):
        from engine.tasks import read_items

        return read_items(task, os.path.join(directory, f"{task}.jsonl"))

    return read


def _use_items(items) -> None:
    from engine.tasks import encode_pair

    for item in items:
        assert isinstance(item.context, str) and len(item.choices) >= 2, item
        assert all(isinstance(c, str) for c in item.choices) and 0 <= item.label < len(item.choices), item
        for choice in item.choices:
            encode_pair(lambda s: [ord(c) for c in s], item.context, " " + choice, 0)


def _read_nanogpt(directory: str):
    from from_nanogpt import import_checkpoint

    return import_checkpoint("ckpt.pt", "out-nano", None, None)  # run in `directory`: data/<its dataset> is there


def _use_import(path) -> None:
    from engine.checkpoint import load_model

    _use_model(load_model(path))


def _read_meta_pkl(directory: str):
    from from_nanogpt import import_dataset

    return import_dataset(os.path.join("data", "nano"))


def _use_dataset_meta(meta) -> None:
    from engine.data import load_data

    _use_plain_dataset(load_data(os.path.join("data", "nano"), block_size=8))


def _use_plain_dataset(data) -> None:
    from engine.data import Tokenizer, get_batch

    x, _ = get_batch(data, "train", 2, 8, (0, 0, 1, 2), "cpu")
    Tokenizer(data.meta).decode(x[0].tolist())
    data.close()


READERS = [
    Reader("dataset meta.json", "dataset", "data/tiny/meta.json", "json", _read_dataset, _use_dataset),
    Reader("checkpoint meta.json", "run", "out/ckpt-0000003/meta.json", "json", _read_checkpoint, _use_model),
    Reader("checkpoint state.pt", "run", "out/ckpt-0000003/state.pt", "torch", _read_state, _use_model),
    Reader("config.json (gpt2)", "hf_gpt2", "config.json", "json", _read_hf, _use_hf),
    Reader("config.json (llama)", "hf_llama", "config.json", "json", _read_hf, _use_hf),
    Reader("config.json (bert)", "hf_bert", "config.json", "json", _read_hf, _use_hf),
    Reader("config.json (bert classifier)", "hf_classifier", "config.json", "json", _read_hf, _use_hf),
    Reader("dataset meta.json (classify)", "labelled", "data/tiny/meta.json", "json", _read_dataset, _use_labelled),
    Reader("tokenizer.json (BPE)", "files", "bpe.json", "json", _read_tokenizer("bpe.json"), _use_tokenizer),
    Reader("tokenizer.json (char)", "files", "char.json", "json", _read_tokenizer("char.json"), _use_tokenizer),
    Reader("task file (choice)", "files", "choice.jsonl", "jsonl", _read_task("choice"), _use_items),
    Reader("task file (hellaswag)", "files", "hellaswag.jsonl", "jsonl", _read_task("hellaswag"), _use_items),
    Reader("nanoGPT ckpt.pt", "nano", "ckpt.pt", "torch", _read_nanogpt, _use_import, writes=True),
    Reader("nanoGPT meta.pkl", "nano", "data/nano/meta.pkl", "pickle", _read_meta_pkl, _use_dataset_meta, writes=True),
]


def load_base(reader: Reader, worlds: dict[str, str]) -> Any:
    """The valid content of the reader's file in the world, as the value its variants mutate."""
    path = os.path.join(worlds[reader.template], reader.file)
    if reader.kind == "json":
        with open(path) as f:
            return json.load(f)
    if reader.kind == "jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f]
    if reader.kind == "pickle":
        with open(path, "rb") as f:
            return pickle.load(f)
    return torch.load(path, weights_only=True)


# --- hostile variants ------------------------------------------------------------------------------------------------

WEIRD_STRINGS = ["", "..", ".", "/etc", "../../outside", "a/b", "\n", "x" * 300, "☃", "\x00", "NaN", "-1", "1e999"]
WEIRD_NUMBERS = [0, 1, -1, 2, 7, 8, 9, 12, 2**16, 2**31, 2**32, 2**53 + 1, 2**63, -(2**63), 10**30]
WEIRD_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 0.5, 1.5, 1e-300]
REGEXES = ["(a+)+$", "(a|aa)*b", "(", "\\1(a)", "(?<x>a)\\k<x>", "[", "a{99999999999}", "\\s*\\s*\\s*x", "x" * 2000]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(WEIRD_NUMBERS),
    st.integers(-(2**70), 2**70),
    st.sampled_from(WEIRD_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WEIRD_STRINGS),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def tensors() -> st.SearchStrategy:
    """Tensors a hostile state.pt or ckpt.pt may hold where a tensor or a number belongs."""
    return st.sampled_from(["zeros3", "nan", "int2x2", "scalar", "ones1000", "bool", "empty", "inf8x8"]).map(_tensor)


def _tensor(kind: str) -> torch.Tensor:
    return {
        "zeros3": lambda: torch.zeros(3),
        "nan": lambda: torch.tensor(float("nan")),
        "int2x2": lambda: torch.zeros(2, 2, dtype=torch.int64),
        "scalar": lambda: torch.tensor(5),
        "ones1000": lambda: torch.ones(1000),
        "bool": lambda: torch.ones(2, dtype=torch.bool),
        "empty": lambda: torch.zeros(0),
        "inf8x8": lambda: torch.full((8, 8), float("inf")),
    }[kind]()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (a tuple of keys and indices) to a value inside `value`, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):  # a tuple (AdamW's betas, a merge pair) is replaced whole
        for i, inner in enumerate(value):
            found += _paths(inner, (*prefix, i))
    return found


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw, base: Any, with_tensors: bool = False) -> Any:
    """`base` with one to three changes: a value replaced (by a hostile one, a nudged number, a tokenizer regex or
    another value from the file), a key deleted or an extra one added."""
    value = copy.deepcopy(base)
    replacements = st.one_of(json_values, tensors()) if with_tensors else json_values
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths[1:] or paths))
        parent, key = (_at(value, path[:-1]), path[-1]) if path else (None, None)
        old = _at(value, path)
        action = draw(st.sampled_from(["replace", "replace", "nudge", "regex", "swap", "delete", "add"]))
        if action == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            new = old + draw(st.sampled_from([-(2**40), -2, -1, 1, 2, 2**40]))
        elif action == "regex" and isinstance(old, str):
            new = draw(st.sampled_from(REGEXES))
        elif action == "swap":
            new = copy.deepcopy(_at(value, draw(st.sampled_from(paths))))
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
            continue
        elif action == "add" and isinstance(old, dict):
            old[draw(st.sampled_from(["extra", "../x", "", "model_config"]))] = draw(replacements)
            continue
        else:
            new = draw(replacements)
        if parent is None:
            value = new
        else:
            parent[key] = new
    return value


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def variants(reader: Reader, base: Any) -> st.SearchStrategy:
    """Hostile contents for the reader's file, as bytes: mostly the base mutated and written as the reader's format,
    sometimes bytes that do not parse: empty, truncated, random, nested past any stack."""
    if reader.kind == "torch":
        values = mutated(base, with_tensors=True).map(_torch_bytes)
    elif reader.kind == "pickle":
        values = mutated(base).map(pickle.dumps)
    elif reader.kind == "jsonl":
        values = mutated(base).map(lambda rows: _jsonl(rows).encode("utf-8"))
    else:
        values = mutated(base).map(lambda v: json.dumps(v).encode("utf-8"))
    whole = _serialise(reader.kind, base)
    broken = st.one_of(
        st.just(b""),
        st.integers(0, max(len(whole) - 1, 0)).map(lambda n: whole[:n]),
        st.binary(max_size=64),
        st.sampled_from([_deep(100_000).encode(), b"\xff\xfe\x00", b"NaN", b"[]", b"null", b'"text"']),
    )
    return st.one_of(values, values, values, broken)


def _jsonl(rows: Any) -> str:
    if isinstance(rows, list):
        return "".join(json.dumps(row) + "\n" for row in rows)
    return json.dumps(rows) + "\n"


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _serialise(kind: str, value: Any) -> bytes:
    if kind == "torch":
        return _torch_bytes(value)
    if kind == "pickle":
        return pickle.dumps(value)
    if kind == "jsonl":
        return _jsonl(value).encode("utf-8")
    return json.dumps(value).encode("utf-8")


# --- the harness -----------------------------------------------------------------------------------------------------


def snapshot(directory: str) -> dict:
    """Every file's bytes and mtime, and every directory, under `directory`."""
    found = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.join(parent, name)] = "dir"
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return found


@contextlib.contextmanager
def stderr_to(path: str):
    """File descriptor 2 into `path` for the block: what the Rust library prints (a panic) bypasses sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def inside(directory: str):
    here = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(here)


def attempt(reader: Reader, worlds: dict[str, str], content: bytes, outcomes: dict | None = None) -> str | None:
    """Feed `content` as the reader's file to the reader in a fresh copy of its world: None when it behaved (refused in
    one line naming the directory and changed nothing, or accepted something that then works), else what went
    wrong. `outcomes` counts how often the reader "accepted" and "refused" the file."""
    scratch = tempfile.mkdtemp(prefix="hostile-")
    try:
        world = os.path.join(scratch, "world")
        shutil.copytree(worlds[reader.template], world)
        with open(os.path.join(world, reader.file), "wb") as f:
            f.write(content)
        before = snapshot(world)
        err = os.path.join(scratch, "stderr")
        result, refusal, crash = None, None, None
        with inside(world), stderr_to(err), _quiet():
            try:
                result = reader.read(world)
            except UserError as e:
                refusal = str(e)
            except BaseException as e:  # a Rust panic (pyo3's PanicException) derives from BaseException
                if isinstance(e, KeyboardInterrupt):
                    raise
                crash = f"{type(e).__name__}: {str(e)[:300]}"
            if refusal is None and crash is None:
                try:
                    reader.use(result)
                except UserError as e:  # a problem found on use: still one line, as the entry scripts report it
                    if "\n" in str(e) or "\r" in str(e):
                        crash = f"a refusal on use in more than one line: {str(e)[:300]!r}"
                except BaseException as e:
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    crash = f"accepted, then {type(e).__name__} in use: {str(e)[:300]}"
        if outcomes is not None:
            outcome = "refused" if refusal is not None else "crashed" if crash and result is None else "accepted"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        with open(err, "rb") as f:
            printed = f.read().decode("utf-8", "replace")
        if "panicked" in printed:
            return f"the tokenizers library panicked: {printed.strip().splitlines()[0][:200]}"
        if crash:
            return crash
        if refusal is not None:
            if "\n" in refusal or "\r" in refusal:
                return f"refused in more than one line: {refusal[:300]!r}"
            names = (world, os.path.realpath(world), reader.file, os.path.dirname(reader.file) or reader.file)
            if not any(name in refusal for name in names):
                return f"refused without naming the file: {refusal[:300]!r}"
            if snapshot(world) != before:
                return f"refused, but changed files: {refusal[:200]!r}"
        elif not reader.writes and snapshot(world) != before:
            return "accepted, and changed files while reading"
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """The readers' progress bars and notes (stdout) out of the way."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def summary(content: bytes) -> str:
    """A failing input, short enough to print."""
    text = content[:300]
    return repr(text) + (f" ... ({len(content)} bytes)" if len(content) > 300 else "")
