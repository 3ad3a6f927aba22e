"""Tiny-shakespeare with the GPT-2 BPE (tiktoken), 90% train / 10% validation: the data for fine-tuning GPT-2.

    python prepare/shakespeare.py                  # writes data/shakespeare/
    TIKTOKEN_CACHE_DIR=/path/to/cache python prepare/shakespeare.py   # offline, with tiktoken's cache files

Uses <out>/input.txt (data/shakespeare/input.txt) when it exists, else the copy prepare/shakespeare_char.py already
fetched (data/shakespeare_char/input.txt), else downloads tiny-shakespeare.
"""

import argparse
import os

import numpy as np
from token_writer import TINY_SHAKESPEARE_URL, fail, read_or_download, write_dataset
from tokenization import TokenizerUnavailable, encoding_hash, load_encoding


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("data", "shakespeare"), help="dataset directory")
    parser.add_argument("--input", default=None, help="text file to use (default: <out>/input.txt)")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name")
    parser.add_argument("--tokenizer_dir", default=None, help="directory with GPT-2's vocab.bpe and encoder.json")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the text kept for validation")
    args = parser.parse_args(argv)
    own, chars = os.path.join(args.out, "input.txt"), os.path.join("data", "shakespeare_char", "input.txt")
    default = chars if not os.path.exists(own) and os.path.exists(chars) else own  # the same text: no second copy
    text = read_or_download(args.input or default, TINY_SHAKESPEARE_URL)
    try:
        enc = load_encoding(args.tokenizer, args.tokenizer_dir)
    except TokenizerUnavailable as e:
        fail(str(e))
    n = len(text)
    split_at = int(n * (1 - args.val_fraction))
    train_ids = np.array(enc.encode_ordinary(text[:split_at]), dtype=np.int64)
    val_ids = np.array(enc.encode_ordinary(text[split_at:]), dtype=np.int64)
    tokenizer = {
        "tokenizer": args.tokenizer,
        "tokenizer_hash": encoding_hash(enc),
        "vocab_size": enc.n_vocab,
        "eot_id": enc.eot_token,
    }
    meta = write_dataset(args.out, {"train": train_ids, "val": val_ids}, tokenizer, source="tiny-shakespeare")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens -> {os.path.join(args.out, info['file'])}")


if __name__ == "__main__":
    main()
