"""Tiny-shakespeare at the character level: a 65-symbol vocabulary, 90% train / 10% validation.

    python prepare/shakespeare_char.py                      # writes data/shakespeare_char/
    python prepare/shakespeare_char.py --out=data/my_char   # another directory

Uses data/shakespeare_char/input.txt (or <out>/input.txt) when it exists; otherwise downloads tiny-shakespeare.
"""

import argparse
import os

import numpy as np
from token_writer import TINY_SHAKESPEARE_URL, read_or_download, write_dataset
from tokenization import chars_hash


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("data", "shakespeare_char"), help="dataset directory")
    parser.add_argument("--input", default=None, help="text file to use (default: <out>/input.txt)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the text kept for validation")
    args = parser.parse_args(argv)
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
    main()
