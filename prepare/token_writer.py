"""Shared by the prepare scripts: fetch a source text and write a dataset in the token-file contract.

The contract (read by data.py): data/<name>/{train,val}.bin hold flat token ids (uint16 when the vocabulary fits,
uint32 otherwise) and meta.json describes them. Every file is written under a temporary name and renamed into
place when complete, and meta.json comes last, so an interrupted prepare never leaves a dataset that looks finished.
"""

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

FORMAT = "nanogpt-tokens/1"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def fail(message: str):
    """One line on stderr and exit code 2: the prepare scripts' user-facing errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_or_download(path: str, url: str) -> str:
    """The text at `path`, downloading it from `url` first when the file does not exist yet."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        print(f"downloading {url} -> {path}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            fail(f"could not download {url} ({e}); offline, put the file at {path} and run this again")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    with open(path, encoding="utf-8") as f:
        return f.read()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _replace_atomically(tmp: str, path: str):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(out_dir: str, splits: dict, tokenizer: dict, source: str) -> dict:
    """Write each split's token ids (a 1-D integer array) to <split>.bin and then meta.json. `tokenizer` holds
    "tokenizer", "vocab_size", "eot_id" and, for char, "chars". Returns the metadata written."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(tokenizer["vocab_size"])
    meta = {"format": FORMAT, **tokenizer, "dtype": dtype.name, "source": source, "splits": {}}
    for split, ids in splits.items():
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= tokenizer["vocab_size"]):
            raise ValueError(f"{split}: token ids outside [0, {tokenizer['vocab_size']})")
        arr = arr.astype(dtype)
        path = os.path.join(out_dir, f"{split}.bin")
        tmp = path + ".tmp"
        sha = hashlib.sha256()
        chunk = 1 << 22
        with open(tmp, "wb") as f:
            for start in tqdm(range(0, len(arr), chunk), desc=f"writing {split}.bin", unit="chunk", leave=False):
                block = arr[start : start + chunk].tobytes()
                sha.update(block)
                f.write(block)
        _replace_atomically(tmp, path)
        meta["splits"][split] = {"file": f"{split}.bin", "tokens": int(len(arr)), "sha256": sha.hexdigest()}
    meta_path = os.path.join(out_dir, "meta.json")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    _replace_atomically(meta_path + ".tmp", meta_path)
    return meta
