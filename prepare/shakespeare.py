"""Tiny-shakespeare with the GPT-2 BPE (tiktoken), 90% train / 10% validation: the data for fine-tuning GPT-2.

    python prepare/shakespeare.py                  # writes data/shakespeare/
    TIKTOKEN_CACHE_DIR=/path/to/cache python prepare/shakespeare.py   # offline, with tiktoken's cache files

Uses <out>/input.txt (data/shakespeare/input.txt) when it exists, else the copy prepare/shakespeare_char.py already
fetched (data/shakespeare_char/input.txt), else downloads tiny-shakespeare.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from token_writer import TINY_SHAKESPEARE_URL, fail, read_or_download, write_dataset

from engine.configurator import parse_config
from engine.errors import run_cli
from engine.tokenization import TokenizerUnavailable, tiktoken_manifest


@dataclass
class BPEConfig:
    out: str = os.path.join("data", "shakespeare")  # dataset directory
    input: str | None = None  # text file to use (default: <out>/input.txt, else shakespeare_char's copy)
    tokenizer: str = "gpt2"  # tiktoken encoding name
    tokenizer_dir: str | None = None  # directory with GPT-2's vocab.bpe and encoder.json (offline)
    val_fraction: float = 0.1  # share of the text kept for validation

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")


def main(argv=None):
    args = parse_config(BPEConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    own, chars = os.path.join(args.out, "input.txt"), os.path.join("data", "shakespeare_char", "input.txt")
    default = chars if not os.path.exists(own) and os.path.exists(chars) else own  # the same text: no second copy
    text = read_or_download(args.input or default, TINY_SHAKESPEARE_URL)
    try:
        enc, tokenizer = tiktoken_manifest(args.tokenizer, args.tokenizer_dir)
    except TokenizerUnavailable as e:
        fail(str(e))
    n = len(text)
    split_at = int(n * (1 - args.val_fraction))
    train_ids = np.array(enc.encode_ordinary(text[:split_at]), dtype=np.int64)
    val_ids = np.array(enc.encode_ordinary(text[split_at:]), dtype=np.int64)
    meta = write_dataset(args.out, {"train": train_ids, "val": val_ids}, tokenizer, source="tiny-shakespeare")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens -> {os.path.join(args.out, info['file'])}")


if __name__ == "__main__":
    run_cli(main)
