"""Labelled texts -> a classification dataset, to fine-tune an encoder into a classifier (train.py --arch=encoder).

    python prepare/classify.py --input=reviews.jsonl --text_column=text --label_column=label --out=data/reviews
    python prepare/classify.py --input=train.csv --val_input=test.csv --tokenizer=data/shakespeare_char --out=data/x
    python prepare/classify.py --input=train.jsonl --tokenizer=bert-base-uncased/tokenizer.json --out=data/x_bert

One text and one label per row of a local .jsonl, .json, .parquet or .csv file, or of a hub dataset. Labels may be
any strings (or numbers); the label set, in order, goes to meta.json's "classify" (numbers sort as numbers, other
labels alphabetically). Validation rows are --val_input's, or a random --val_fraction of the input.

--tokenizer is what the encoder to fine-tune was trained with: gpt2 (or another tiktoken encoding), char (a new
character vocabulary of these texts), a tokenizer.json (a Hugging Face model directory's, e.g. bert-base-uncased's
WordPiece), or a prepared dataset directory, whose tokenizer is reused (a character vocabulary included: the
encoder trained on it reads these texts). Writes <out>/{train,val}.bin (each text's tokens, one after another),
{train,val}.starts.bin (int64: where each text starts, then the end), {train,val}.labels.bin (int64: each text's label
index) and meta.json (engine/data.py).
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from table import read_columns, split_rows
from token_writer import DatasetWriter, fail
from tqdm import tqdm

from engine.configurator import parse_config
from engine.data import Tokenizer, load_data
from engine.errors import UserError, run_cli
from engine.tokenization import (
    TokenizerUnavailable,
    chars_hash,
    read_tokenizer_json,
    tiktoken_manifest,
    tokenizer_json_hash,
    train_bpe,
)


@dataclass
class ClassifyConfig:
    input: str = ""  # a .jsonl, .json, .parquet or .csv file of labelled texts, or a hub dataset name
    out: str = ""  # dataset directory, e.g. data/<name>
    text_column: str = "text"  # the column holding each text
    label_column: str = "label"  # the column holding each text's label
    val_input: str | None = None  # held-out rows in a file of their own (e.g. test.csv); none = val_fraction of input
    val_fraction: float = 0.1  # without val_input: the share of rows held out for validation (at least one)
    config: str | None = None  # hub dataset configuration name
    split: str = "train"  # split to read (hub datasets)
    tokenizer: str = "gpt2"  # gpt2 or another tiktoken encoding, char, a tokenizer.json, or a prepared dataset's dir
    tokenizer_dir: str | None = None  # directory with GPT-2's vocab.bpe and encoder.json (offline)
    seed: int = 2357  # seed of the random validation split
    cache_dir: str | None = None  # datasets cache directory (default: datasets' own)

    def __post_init__(self):
        if not self.input:
            raise ValueError("--input is needed: a .jsonl/.json/.parquet/.csv file or a hub dataset name")
        if not self.out:
            raise ValueError("--out is needed: the dataset directory, e.g. --out=data/reviews")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")


def read_labelled(args: ClassifyConfig, path: str) -> tuple[list[str], list[str], str]:
    """(texts, labels as strings, source) of a file or hub dataset; a row without text or label is one line."""
    columns, source = read_columns(path, [args.text_column, args.label_column], args.config, args.split, args.cache_dir)
    texts, labels = columns[args.text_column], columns[args.label_column]
    for n, (text, label) in enumerate(zip(texts, labels, strict=True), 1):
        if not isinstance(text, str) or not text.strip():
            fail(
                f"row {n} of {path} has no text in column {args.text_column!r} (got {str(text)[:50]!r}); fix or drop it"
            )
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            fail(
                f"row {n} of {path} has no label in column {args.label_column!r} (got {label!r}); give a string or a "
                "whole number"
            )
    return texts, [str(label).strip() for label in labels], source


def label_order(labels: set[str]) -> list[str]:
    """The label set in index order: numbers as numbers ("2" before "10"), other labels alphabetically."""
    numeric = all(label.lstrip("-").isascii() and label.lstrip("-").isdigit() for label in labels)
    return sorted(labels, key=int) if numeric else sorted(labels)


def make_tokenizer(args: ClassifyConfig, texts: list[str]) -> tuple:
    """(encode, the tokenizer's meta.json entry, a tokenizer.json's text to save beside the data or None)."""
    name = args.tokenizer
    if os.path.isdir(name):  # a prepared dataset: the tokenizer its encoder was trained with
        try:
            meta = load_data(name, 1, splits=()).meta
        except UserError as e:
            fail(f"--tokenizer={name} is not a readable prepared dataset ({e})")
        keys = ("tokenizer", "tokenizer_hash", "vocab_size", "eot_id", "chars", "tokenizer_file")
        info = {k: meta[k] for k in keys if meta.get(k) is not None}
        if meta.get("chat"):
            fail(f"--tokenizer={name} is a chat dataset; name the plain-text dataset the encoder was trained on")
        special = sorted((meta.get("seq2seq") or {}).get("special", {}).values())  # a seq2seq dataset's <pad>, </s>
        if special and special == list(range(meta["vocab_size"] - len(special), meta["vocab_size"])):
            info["vocab_size"] -= len(special)  # the ids it added after the text's: this dataset adds its own
        return Tokenizer(meta, args.tokenizer_dir).encode, info, meta.get("tokenizer_json")
    if name == "char":
        chars = "".join(sorted(set("".join(texts))))
        info = {"tokenizer": "char", "tokenizer_hash": chars_hash(chars), "vocab_size": len(chars), "eot_id": None}
        info["chars"] = chars
        return Tokenizer(info).encode, info, None
    if name == "bpe" or name.endswith(".json"):  # a byte-level BPE trained on these texts, or one to reuse
        tokenizer = (
            train_bpe(texts, getattr(args, "bpe_vocab_size", 8192), length=len(texts)) if name == "bpe" else None
        )
        text, tokenizer = (tokenizer.to_str(), tokenizer) if tokenizer else read_tokenizer_json(name)
        info = {"tokenizer": "tokenizer.json", "tokenizer_file": "tokenizer.json"}
        info |= {"tokenizer_hash": tokenizer_json_hash(text), "vocab_size": tokenizer.get_vocab_size(), "eot_id": None}
        return Tokenizer(info | {"tokenizer_json": text}).encode, info, text
    try:
        _, info = tiktoken_manifest(name, args.tokenizer_dir)
    except TokenizerUnavailable as e:
        fail(str(e))
    return Tokenizer(info, args.tokenizer_dir).encode, info, None


def check_characters(tokenizer: dict, texts: list[str], name: str) -> None:
    """A reused character vocabulary may lack some of the texts' characters: the first text that holds one is named,
    before any work."""
    if tokenizer["tokenizer"] != "char":
        return
    known = set(tokenizer["chars"])
    for n, text in enumerate(texts):
        if not set(text) <= known:
            fail(
                f"text {n + 1} ({text[:40]!r}) holds {''.join(sorted(set(text) - known))!r}, not in the character "
                f"vocabulary of {name}; use --tokenizer=char (and pretrain on such text) or another tokenizer"
            )


def main(argv=None):
    args = parse_config(ClassifyConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    texts, labels, source = read_labelled(args, args.input)
    n, n_val = len(texts), None
    if args.val_input is not None:
        val_texts, val_labels, val_source = read_labelled(args, args.val_input)
        texts, labels, source = texts + val_texts, labels + val_labels, f"{source}; validation: {val_source}"
        n_val = len(val_texts)
    rows = split_rows(n, n_val, args.val_fraction, args.seed, args.input, "row(s)")
    names = label_order(set(labels[i] for i in rows["train"]))
    if len(names) < 2:
        fail(f"the training rows hold {len(names)} label(s) ({', '.join(names)}); a classifier needs at least 2")
    unseen = sorted(set(labels) - set(names))
    if unseen:
        fail(f"validation rows hold label(s) the training rows never do: {', '.join(unseen[:5])}; add training rows")
    encode, tokenizer, tokenizer_json = make_tokenizer(args, texts)
    check_characters(tokenizer, texts, args.tokenizer)
    ids = []
    for n, text in enumerate(tqdm(texts, desc="tokenizing", unit="text")):
        ids.append(np.asarray(encode(text), dtype=np.int64))
        if len(ids[-1]) == 0:
            fail(f"text {n + 1} ({text[:40]!r}) encodes to no tokens; drop it")
    index = {name: i for i, name in enumerate(names)}
    with DatasetWriter(args.out) as writer:  # the previous dataset stays until the new one is complete
        if tokenizer_json is not None:
            writer.write_bytes(tokenizer.get("tokenizer_file", "tokenizer.json"), tokenizer_json.encode("utf-8"))
        splits = {}
        for split, picks in rows.items():
            tokens = np.concatenate([ids[i] for i in picks])
            splits[split] = writer.write_split(split, [tokens], tokenizer["vocab_size"], total=len(tokens))
            splits[split]["documents"] = len(picks)
            starts = np.cumsum([0] + [len(ids[i]) for i in picks], dtype=np.int64)
            label_ids = np.asarray([index[labels[i]] for i in picks], dtype=np.int64)
            for part, array in (("starts", starts), ("labels", label_ids)):
                splits[split][f"{part}_file"] = f"{split}.{part}.bin"
                splits[split][f"{part}_sha256"] = writer.write_array(f"{split}.{part}.bin", array)
        meta = writer.commit(tokenizer | {"classify": {"labels": names}}, source, splits)
    print(f"{len(texts):,} texts, {len(names)} labels: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    for split, picks in rows.items():
        counts = np.bincount([index[labels[i]] for i in picks], minlength=len(names))
        share = ", ".join(f"{names[k]} {c / len(picks):.0%}" for k, c in enumerate(counts[:10]))
        print(f"{split}: {len(picks):,} texts, {splits[split]['tokens']:,} tokens ({share})")
    lengths = np.array([len(t) for t in ids])
    most = int(np.quantile(lengths, 0.9))
    print(
        f"texts are {int(np.median(lengths)):,} tokens long at the median, {most:,} at 90% and {lengths.max():,} at "
        f"most: train with --block_size at least {most + 2} ([CLS] and [SEP] included) to read 90% of them whole"
    )
    return meta


if __name__ == "__main__":
    run_cli(main)
