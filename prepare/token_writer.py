"""Shared by the prepare scripts: fetch and check a source text, and write a dataset in the token-file contract.

The contract (read by engine/data.py): data/<name>/{train,val}.bin hold flat token ids (uint16 when the vocabulary fits,
uint32 otherwise) and meta.json describes them. A new dataset is built beside the old one and swapped in only when
complete (DatasetWriter), so a failed or interrupted prepare leaves the previous dataset untouched.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python prepare/x.py: the root too
from engine.errors import UserError
from engine.files import TEMPORARY, fresh_dir, write_error, write_file

FORMAT = "nanogpt-tokens/1"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# a staging directory of DatasetWriter (and the names older versions staged files under), with the writer's pid
_STAGED = re.compile(
    rf"^(?:{re.escape(TEMPORARY)}dataset-(\d+)-|(?:train|val|meta|tokenizer)(?:\.mask|\.starts)?\.(?:bin|json)\.tmp-(\d+)$)"
)


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
        try:
            write_file(path, body)  # whole, never through a symlink
        except UserError as e:
            fail(str(e))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t UTF-8")
    if not text:
        fail(f"{path} is empty; put text in it (or delete it to download the default corpus)")
    return text


def check_source_file(path: str) -> None:
    """Refuse, in one line naming the file and its line, a local input in a text format (.txt, .csv, .json, .jsonl;
    Parquet's strings are checked once loaded: first_invalid_utf8) that no parser should be given: bytes that are not
    UTF-8 (a surrogate's bytes included) and, in .json and .jsonl files, an escaped lone surrogate ("\\ud800":
    json.loads takes it, then encoding the text fails) or nesting deeper than MAX_JSON_DEPTH (Python's parser raises
    RecursionError, pyarrow's overflows its stack: a segfault). Read in chunks of whole lines, so a file of any size
    costs little memory and a multi-byte character or a JSON string is never cut in two."""
    is_json = path.lower().endswith((".json", ".jsonl"))
    line, depth = 1, 0  # where the chunk starts, and the JSON nesting there (a document may span lines)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES) + f.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                where = line + chunk.count(b"\n", 0, e.start)
                fail(f"{path}:{where}: not UTF-8 text (byte {chunk[e.start]:#04x}); convert it, e.g. iconv -t UTF-8")
            if is_json:
                depth = _check_json(path, chunk, line, depth)
            line += chunk.count(b"\n")


MAX_JSON_DEPTH = 100  # nesting levels of a JSON input: a row nests a few; Python's parser fails past ~1,000
_CHUNK_BYTES = 8 << 20
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_BACKSLASH = re.compile(rb"\\\\")  # an escaped backslash: what is left of a backslash then starts an escape
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")  # one character
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NESTING = np.zeros(256, np.int8)  # per byte outside strings: +1 opens a level, -1 closes one
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1


def _check_json(path: str, chunk: bytes, line: int, depth: int) -> int:
    """The nesting depth at the end of `chunk` (whole lines of JSON from `line` on, starting `depth` deep), after
    refusing an escaped lone surrogate or nesting past MAX_JSON_DEPTH in it. A JSON string holds no raw newline, so
    lines are still counted right in what is left of the chunk once escapes or strings are taken out."""
    escapes = _SURROGATE_PAIR.sub(b"", _BACKSLASH.sub(b"", chunk))
    if lone := _SURROGATE.search(escapes):
        where = line + escapes.count(b"\n", 0, lone.start())
        fail(f"{path}:{where}: {lone.group().decode()} is half a surrogate pair, not a character; fix that string")
    outside = _STRING.sub(b'""', chunk)  # brackets inside strings are text
    levels = np.cumsum(_NESTING[np.frombuffer(outside, np.uint8)], dtype=np.int32) + depth
    deep = np.flatnonzero(levels > MAX_JSON_DEPTH)
    if deep.size:
        where = line + outside.count(b"\n", 0, int(deep[0]))
        fail(f"{path}:{where}: nested more than {MAX_JSON_DEPTH} levels deep; no dataset row nests like that")
    return int(levels[-1]) if levels.size else depth


def first_invalid_utf8(column) -> int | None:
    """The index of the first row of a pyarrow string column that is not valid UTF-8, or None. Arrow checks only
    on request, and a Parquet file or a hub dataset may hold any bytes; the bad row is found by halving."""
    import pyarrow as pa

    def valid(array) -> bool:
        try:
            array.validate(full=True)
        except pa.ArrowInvalid:
            return False
        return True

    offset = 0
    for chunk in column.chunks:
        if not valid(chunk):
            lo, hi = 0, len(chunk)  # the first bad row is in [lo, hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if valid(chunk.slice(lo, mid - lo)) else (lo, mid)
            return offset + lo
        offset += len(chunk)
    return None


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
    """Builds a dataset beside the one already in out_dir and swaps it in only when complete: files are written in
    a fresh staging directory of its own inside out_dir (nothing planted there in advance is written to), and
    commit() renames them into place with meta.json last (a symlink at a name is replaced, never written through).
    Until then nothing in out_dir changes, so an empty input, a crash, Ctrl-C or a full disk leaves the previous
    dataset (and a char dataset's vocabulary in meta.json) as it was. Leaving the `with` block without commit()
    removes what was staged; what a process that died (kill -9) staged is removed by the next writer."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.staged: dict[str, str] = {}  # final path -> staged path
        try:
            os.makedirs(out_dir, exist_ok=True)
            for name in os.listdir(out_dir):
                m = _STAGED.match(name)
                path = os.path.join(out_dir, name)
                if m and not _alive(int(m.group(1) or m.group(2))) and not os.path.islink(path):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            self.staging = fresh_dir(out_dir, f"{TEMPORARY}dataset-")
        except OSError as e:
            fail(str(write_error(e, out_dir, "the previous dataset")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staged = {}

    def _stage(self, name: str) -> str:
        path = os.path.join(self.out_dir, name)
        self.staged[path] = os.path.join(self.staging, name)
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
            fail(str(write_error(e, tmp, f"the previous dataset in {self.out_dir}")))

    def commit(self, tokenizer: dict, source: str, splits: dict) -> dict:
        """Refuse an empty split (the old dataset stays), else write meta.json, swap everything in and return the
        manifest. `tokenizer` holds "tokenizer", "tokenizer_hash", "vocab_size", "eot_id" and, for char, "chars"."""
        for split, info in splits.items():
            if info["tokens"] == 0:
                fail(f"the {split} split is empty; give more text or change --val_fraction")
        meta = {"format": FORMAT, **tokenizer, "dtype": token_dtype(tokenizer["vocab_size"]).name, "source": source}
        meta["splits"] = splits
        with self._writing(self._stage("meta.json")) as f:
            f.write(json.dumps(meta, indent=2).encode())
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
