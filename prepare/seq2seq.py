"""Pairs of texts -> a seq2seq dataset, to train an encoder-decoder (train.py --arch=encoder_decoder).

    python prepare/seq2seq.py --input=pairs.jsonl --source_column=source --target_column=target --out=data/pairs
    python prepare/seq2seq.py --input=train.csv --val_input=test.csv --tokenizer=char --out=data/pairs_char
    python prepare/seq2seq.py --input=train.jsonl --tokenizer=t5-small/tokenizer.json --out=data/pairs_t5

One source and one target per row of a local .jsonl, .json, .parquet or .csv file, or of a hub dataset; a row
without both is named by its number. Validation rows are --val_input's, or a random --val_fraction of the input.
--tokenizer: gpt2 (or another tiktoken encoding), char (a new character vocabulary of these texts), bpe (a byte-level
BPE of --bpe_vocab_size trained on them), a tokenizer.json (a Hugging Face T5 directory's, whose <pad> and </s> are
used), or a prepared dataset's directory (its tokenizer reused). Writes <out>/{train,val}.bin and .starts.bin (the
sources, one after another, and where each starts), {train,val}.target.bin and .target_starts.bin (the targets), and
meta.json with the <pad> and </s> ids (engine/seq2seq.py).
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from classify import check_characters, make_tokenizer
from table import read_columns, split_rows
from token_writer import DatasetWriter, fail
from tqdm import tqdm

from engine import seq2seq
from engine.configurator import parse_config
from engine.errors import run_cli


@dataclass
class Seq2SeqConfig:
    input: str = ""  # a .jsonl, .json, .parquet or .csv file of pairs, or a hub dataset name
    out: str = ""  # dataset directory, e.g. data/<name>
    source_column: str = "source"  # the column holding each source text
    target_column: str = "target"  # the column holding each target text
    val_input: str | None = None  # held-out pairs in a file of their own; none = val_fraction of input
    val_fraction: float = 0.1  # without val_input: the share of pairs held out for validation (at least one)
    config: str | None = None  # hub dataset configuration name
    split: str = "train"  # split to read (hub datasets)
    tokenizer: str = "gpt2"  # gpt2 or another tiktoken encoding, char, bpe (train one), a tokenizer.json, a dataset dir
    bpe_vocab_size: int = 8192  # with tokenizer=bpe: the trained vocabulary's size, <|endoftext|> included
    tokenizer_dir: str | None = None  # directory with GPT-2's vocab.bpe and encoder.json (offline)
    seed: int = 2357  # seed of the random validation split
    cache_dir: str | None = None  # datasets cache directory (default: datasets' own)

    def __post_init__(self):
        if not self.input:
            raise ValueError("--input is needed: a .jsonl/.json/.parquet/.csv file or a hub dataset name")
        if not self.out:
            raise ValueError("--out is needed: the dataset directory, e.g. --out=data/pairs")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer == "bpe" and not 257 <= self.bpe_vocab_size <= 2**20:
            raise ValueError(f"--bpe_vocab_size must be in 257..1048576, got {self.bpe_vocab_size}")


def read_pairs(args: Seq2SeqConfig, path: str) -> tuple[list[str], list[str], str]:
    """(sources, targets, source description) of a file or hub dataset; a row without both is one line."""
    columns = [args.source_column, args.target_column]
    values, source = read_columns(path, columns, args.config, args.split, args.cache_dir)
    for n, pair in enumerate(zip(*(values[c] for c in columns), strict=True), 1):
        for column, text in zip(columns, pair, strict=True):
            if not isinstance(text, str) or not text.strip():
                fail(f"row {n} of {path} has no text in column {column!r} (got {str(text)[:50]!r}); fix or drop it")
    return values[args.source_column], values[args.target_column], source


def main(argv=None):
    args = parse_config(Seq2SeqConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    sources, targets, source = read_pairs(args, args.input)
    n, n_val = len(sources), None
    if args.val_input is not None:
        val_sources, val_targets, val_source = read_pairs(args, args.val_input)
        sources, targets, source = sources + val_sources, targets + val_targets, f"{source}; validation: {val_source}"
        n_val = len(val_sources)
    rows = split_rows(n, n_val, args.val_fraction, args.seed, args.input, "pair(s)")
    encode, tokenizer, tokenizer_json = make_tokenizer(args, sources + targets)
    check_characters(tokenizer, sources + targets, args.tokenizer)
    special = seq2seq.special_tokens(tokenizer["vocab_size"], tokenizer_json)
    tokenizer["vocab_size"] = max(tokenizer["vocab_size"], 1 + max(special.values()))
    ids = {}
    for name, texts in (("source", sources), ("target", targets)):
        ids[name] = [np.asarray(encode(t), dtype=np.int64) for t in tqdm(texts, desc=f"tokenizing {name}s")]
        empty = next((n for n, i in enumerate(ids[name]) if len(i) == 0), None)
        if empty is not None:
            fail(f"{name} {empty + 1} ({texts[empty][:40]!r}) encodes to no tokens; drop it")
    with DatasetWriter(args.out) as writer:  # the previous dataset stays until the new one is complete
        if tokenizer_json is not None:
            writer.write_bytes(tokenizer.get("tokenizer_file", "tokenizer.json"), tokenizer_json.encode("utf-8"))
        splits = {}
        for split, picks in rows.items():
            entry = {"documents": len(picks)}
            for name, prefix in (("source", ""), ("target", "target_")):
                tokens = np.concatenate([ids[name][i] for i in picks])
                starts = np.cumsum([0] + [len(ids[name][i]) for i in picks], dtype=np.int64)
                file = f"{split}.target" if prefix else split  # train.bin (sources), train.target.bin
                written = writer.write_split(file, [tokens], tokenizer["vocab_size"], total=len(tokens))
                entry |= {f"{prefix}{key}": value for key, value in written.items()}
                entry[f"{prefix}starts_file"] = f"{split}.{prefix}starts.bin"
                entry[f"{prefix}starts_sha256"] = writer.write_array(entry[f"{prefix}starts_file"], starts)
            splits[split] = entry
        meta = writer.commit(tokenizer | {"seq2seq": {"special": special}}, source, splits)
    print(f"{len(sources):,} pairs; <pad> is id {special['<pad>']}, </s> id {special['</s>']}")
    for split, picks in rows.items():
        entry = splits[split]
        print(f"{split}: {len(picks):,} pairs, {entry['tokens']:,} source and {entry['target_tokens']:,} target tokens")
    longest = max(int(np.quantile([len(i) for i in ids[name]], 0.9)) for name in ("source", "target"))
    print(
        f"90% of sources and of targets are at most {longest:,} tokens: train with --block_size at least {longest + 1}"
    )
    return meta


if __name__ == "__main__":
    run_cli(main)
