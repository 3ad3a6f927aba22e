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


def _fsync_and_replace(tmp: str, path: str):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_split(out_dir: str, split: str, chunks, vocab_size: int, total: int | None = None) -> dict:
    """Stream 1-D integer arrays into <out_dir>/<split>.bin (via a temporary file) and return its manifest entry.
    `total` (tokens) only sizes the progress bar."""
    dtype = token_dtype(vocab_size)
    path = os.path.join(out_dir, f"{split}.bin")
    tmp = path + ".tmp"
    sha, tokens = hashlib.sha256(), 0
    with open(tmp, "wb") as f, tqdm(total=total, desc=f"writing {split}.bin", unit="tok", unit_scale=True) as bar:
        for chunk in chunks:
            arr = np.asarray(chunk)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"{split}: token ids outside [0, {vocab_size})")
            block = arr.astype(dtype).tobytes()
            sha.update(block)
            f.write(block)
            tokens += arr.size
            bar.update(arr.size)
    _fsync_and_replace(tmp, path)
    return {"file": f"{split}.bin", "tokens": tokens, "sha256": sha.hexdigest()}


def begin_dataset(out_dir: str):
    """Remove a previous meta.json first, so a half-rewritten directory never looks finished."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)


def write_meta(out_dir: str, tokenizer: dict, source: str, splits: dict) -> dict:
    """Write meta.json (atomically, after every .bin is in place) and return it. `tokenizer` holds "tokenizer",
    "tokenizer_hash", "vocab_size", "eot_id" and, for char, "chars"."""
    meta = {"format": FORMAT, **tokenizer, "dtype": token_dtype(tokenizer["vocab_size"]).name, "source": source}
    meta["splits"] = splits
    meta_path = os.path.join(out_dir, "meta.json")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    _fsync_and_replace(meta_path + ".tmp", meta_path)
    return meta


def write_dataset(out_dir: str, splits: dict, tokenizer: dict, source: str, documents: dict | None = None) -> dict:
    """Write in-memory splits (1-D integer arrays) and meta.json; `documents` gives each split's document count."""
    begin_dataset(out_dir)
    entries = {}
    for split, ids in splits.items():
        entries[split] = write_split(out_dir, split, [ids], tokenizer["vocab_size"], total=len(ids))
        entries[split]["documents"] = (documents or {}).get(split, 1)
    return write_meta(out_dir, tokenizer, source, entries)
