"""Shared by the prepare scripts: fetch a source text and write a dataset in the token-file contract.

The contract (read by engine/data.py): data/<name>/{train,val}.bin hold flat token ids (uint16 when the vocabulary fits,
uint32 otherwise) and meta.json describes them. A new dataset is built beside the old one and swapped in only when
complete (DatasetWriter), so a failed or interrupted prepare leaves the previous dataset untouched.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

FORMAT = "nanogpt-tokens/1"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_STAGED = re.compile(r"^(?:train|val|meta|tokenizer)(?:\.mask|\.starts)?\.(?:bin|json)\.tmp-(\d+)$")


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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t UTF-8")
    if not text:
        fail(f"{path} is empty; put text in it (or delete it to download the default corpus)")
    return text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class DatasetWriter:
    """Builds a dataset beside the one already in out_dir and swaps it in only when complete: split files are
    written as <split>.bin.tmp-<pid>, and commit() renames them into place with meta.json last. Until then nothing in
    out_dir changes, so an empty input, a crash, Ctrl-C or a full disk leaves the previous dataset (and a char
    dataset's vocabulary in meta.json) as it was. Leaving the `with` block without commit() removes what was staged;
    files staged by a process that died (kill -9) are removed by the next writer."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.staged: dict[str, str] = {}  # final path -> staged path
        for name in os.listdir(out_dir):
            m = _STAGED.match(name)
            if m and not _alive(int(m.group(1))):
                os.remove(os.path.join(out_dir, name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp in self.staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        self.staged = {}

    def _stage(self, name: str) -> str:
        path = os.path.join(self.out_dir, name)
        self.staged[path] = f"{path}.tmp-{os.getpid()}"
        return self.staged[path]

    def write_split(self, split: str, chunks, vocab_size: int, total: int | None = None) -> dict:
        """Stream 1-D integer arrays into the staged <split>.bin and return its manifest entry. `total` (tokens)
        only sizes the progress bar."""
        dtype = token_dtype(vocab_size)
        tmp = self._stage(f"{split}.bin")
        sha, tokens = hashlib.sha256(), 0
        bar = tqdm(total=total, desc=f"writing {split}.bin", unit="tok", unit_scale=True)
        with self._writing(tmp) as f, bar:
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    raise ValueError(f"{split}: token ids outside [0, {vocab_size})")
                block = arr.astype(dtype).tobytes()
                sha.update(block)
                f.write(block)
                tokens += arr.size
                bar.update(arr.size)
        return {"file": f"{split}.bin", "tokens": tokens, "sha256": sha.hexdigest()}

    def write_array(self, name: str, array: np.ndarray) -> str:
        """Stage one more file of the dataset (a chat split's mask or starts) as raw bytes; returns its sha256."""
        return self.write_bytes(name, np.ascontiguousarray(array).tobytes())

    def write_bytes(self, name: str, data: bytes) -> str:
        """Stage one more file of the dataset (a trained tokenizer.json, ...); returns its sha256."""
        with self._writing(self._stage(name)) as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _writing(self, tmp: str):
        """The staged file open for writing, fsynced when the block ends; a full disk is one line (the previous
        dataset is untouched: nothing has been swapped in yet)."""
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            fail(f"disk full writing {tmp}; the previous dataset in {self.out_dir} is kept; free space and run again")

    def commit(self, tokenizer: dict, source: str, splits: dict) -> dict:
        """Refuse an empty split (the old dataset stays), else write meta.json, swap everything in and return the
        manifest. `tokenizer` holds "tokenizer", "tokenizer_hash", "vocab_size", "eot_id" and, for char, "chars"."""
        for split, info in splits.items():
            if info["tokens"] == 0:
                fail(f"the {split} split is empty; give more text or change --val_fraction")
        meta = {"format": FORMAT, **tokenizer, "dtype": token_dtype(tokenizer["vocab_size"]).name, "source": source}
        meta["splits"] = splits
        with open(self._stage("meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        for path, tmp in self.staged.items():  # meta.json was staged last, so it lands last
            os.replace(tmp, path)
        self.staged = {}
        return meta


def write_dataset(out_dir: str, splits: dict, tokenizer: dict, source: str, documents: dict | None = None) -> dict:
    """Write in-memory splits (1-D integer arrays) and meta.json; `documents` gives each split's document count."""
    with DatasetWriter(out_dir) as writer:
        entries = {}
        for split, ids in splits.items():
            entries[split] = writer.write_split(split, [ids], tokenizer["vocab_size"], total=len(ids))
            entries[split]["documents"] = (documents or {}).get(split, 1)
        return writer.commit(tokenizer, source, entries)
