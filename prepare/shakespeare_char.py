"""Tiny-shakespeare at the character level: a 65-symbol vocabulary, 90% train / 10% validation.

    python prepare/shakespeare_char.py                      # writes data/shakespeare_char/
    python prepare/shakespeare_char.py --out=data/my_char   # another directory

Uses data/shakespeare_char/input.txt (or <out>/input.txt) when it exists; otherwise downloads tiny-shakespeare.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from token_writer import TINY_SHAKESPEARE_URL, read_or_download, write_dataset

from engine.configurator import parse_config
from engine.errors import run_cli
from engine.tokenization import chars_hash


@dataclass
class CharConfig:
    out: str = os.path.join("data", "shakespeare_char")  # dataset directory
    input: str | None = None  # text file to use (default: <out>/input.txt)
    val_fraction: float = 0.1  # share of the text kept for validation

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")


def main(argv=None):
    args = parse_config(CharConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    text = read_or_download(args.input or os.path.join(args.out, "input.txt"), TINY_SHAKESPEARE_URL)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    n_train = int(len(ids) * (1 - args.val_fraction))
    tokenizer = {
        "tokenizer": "char",
        "tokenizer_hash": chars_hash("".join(chars)),
        "vocab_size": len(chars),
        "eot_id": None,
        "chars": "".join(chars),
    }
    meta = write_dataset(args.out, {"train": ids[:n_train], "val": ids[n_train:]}, tokenizer, source="tiny-shakespeare")
    print(f"{len(text):,} characters, vocabulary of {len(chars)}")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens -> {os.path.join(args.out, info['file'])}")


if __name__ == "__main__":
    run_cli(main)
