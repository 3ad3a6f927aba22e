"""The token-file contract, batch sampling and the tokenizer.

A dataset is a directory data/<name>/ written by a prepare/ script:
    train.bin, val.bin   flat arrays of token ids, no header, dtype given by meta.json (uint16 or uint32)
    meta.json            {"format", "tokenizer": "char"|tiktoken name, "vocab_size", "dtype", "eot_id",
                          "chars" (char tokenizer only), "splits": {split: {"file", "tokens", "sha256"}}, "source"}
meta.json is written last, so a directory without it was never finished. nanoGPT's meta.pkl is never unpickled.
A chat split adds "mask_file" and "starts_file" with their "mask_sha256" and "starts_sha256" (prepare/chat.py).
A classification dataset (prepare/classify.py) has "classify": {"labels": [...]}, and each split a "starts_file"
(where each text begins) and a "labels_file" (int64, one label index per text), with their sha256.
A seq2seq dataset (prepare/seq2seq.py) has "seq2seq": {"special": {"<pad>", "</s>"}}, and each split, besides its
sources (file, starts_file), a "target_file" and "target_starts_file" with "target_tokens" and their sha256.

load_data checks meta.json itself (engine/schemas.py DatasetMeta), then every file against it (size, ids, recorded
sha256), and keeps the files open: batches are read through memmaps of those open files, so a dataset prepared again
mid-run (new files os.replace'd into place) never reaches a run that checked the old one.

Batches are a pure function of a key (seed, iteration, global micro-step): a resumed run reads the same windows as
an uninterrupted one, and DDP ranks, which take different micro-steps, never read the same window.
"""

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch

from engine.errors import UserError
from engine.schemas import (
    MAX_TOKENIZER_BYTES,
    DatasetMeta,
    TokenizerJson,
    check,
    parse_json,
    read_json,
    read_text,
)
from engine.tokenization import (
    ENDOFTEXT,
    TokenizerUnavailable,
    byte_to_unicode,
    chars_hash,
    encoding_hash,
    load_encoding,
    specials_as_text,
    tokenizer_from_json,
    tokenizer_json_hash,
)

FULL_CHECK_BYTES = 512 << 20  # token files up to this size have every id checked at load (about 0.1 s)
HASH_CHECK_BYTES = 64 << 20  # and up to this size their sha256 too
PARTS = {"file": "sha256", "mask_file": "mask_sha256", "starts_file": "starts_sha256", "labels_file": "labels_sha256"}
PARTS |= {"target_file": "target_sha256", "target_starts_file": "target_starts_sha256"}  # a seq2seq split's targets


@dataclass
class TokenData:
    """A prepared dataset: its meta.json and the split files load_data checked, held open. Every batch maps the open
    file afresh (memmap()): no long-lived np.memmap grows the process's memory (nanoGPT's lesson), and a file replaced
    by path since (a prepare script run again) is never read. close() or a `with` block closes the files; so does
    dropping the TokenData, and process exit. A pickled copy (another process) opens the files again by path, and
    refuses any that is no longer the file that was checked."""

    data_dir: str
    meta: dict
    files: dict = field(default_factory=dict, repr=False, compare=False)  # (split, part) -> open file
    checked: dict = field(default_factory=dict, repr=False, compare=False)  # (split, part) -> identity of the file

    def __post_init__(self):
        self._finalizer = weakref.finalize(self, _close_files, self.files)  # closes without a ResourceWarning

    def __getstate__(self) -> dict:
        return {"data_dir": self.data_dir, "meta": self.meta, "checked": self.checked}  # open files do not pickle

    def __setstate__(self, state: dict):
        self.__init__(state["data_dir"], state["meta"], checked=state["checked"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        _close_files(self.files)

    @property
    def dtype(self):
        return np.dtype(self.meta["dtype"])

    @property
    def chat(self) -> dict | None:
        """A chat dataset's template and special tokens (prepare/chat.py), or None for plain text."""
        return self.meta.get("chat")

    @property
    def seq2seq(self) -> dict | None:
        """A seq2seq dataset's special tokens (prepare/seq2seq.py), or None."""
        return self.meta.get("seq2seq")

    @property
    def classify(self) -> dict | None:
        """A classification dataset's labels (prepare/classify.py), or None."""
        return self.meta.get("classify")

    def split_path(self, split: str, part: str = "file") -> str:
        """The split's token file, or with part="mask_file" / "starts_file" a chat split's loss mask (uint8, one per
        token: 1 = trained on) and conversation starts (int64, one per conversation plus the end); "labels_file" a
        classification split's labels (int64, one per text; its texts' starts are its starts_file)."""
        return os.path.join(self.data_dir, self.meta["splits"][split][part])

    def file(self, split: str, part: str = "file") -> BinaryIO:
        """The split's file (part as in split_path), open for reading: opened once and kept. Raises OSError when it
        cannot be opened, UserError when it is not the file load_data checked (replaced since)."""
        if (split, part) not in self.files:
            path = self.split_path(split, part)
            f = open(path, "rb")
            identity = _identity(f)
            if self.checked.setdefault((split, part), identity) != identity:
                f.close()
                raise UserError(f"{path} was replaced since this run checked it (prepared again?); restart to use it")
            self.files[split, part] = f
        return self.files[split, part]

    def memmap(self, split: str, part: str = "file") -> np.ndarray:
        """A read-only np.memmap of the split's open file, to drop after use: token ids, or the mask (uint8) or the
        conversation starts (int64). The mapping keeps the file that was opened, even once it is replaced by path."""
        dtype = {"file": self.dtype, "mask_file": np.uint8, "starts_file": np.int64, "labels_file": np.int64}
        dtype = dtype | {"target_file": self.dtype, "target_starts_file": np.int64}
        dtype = dtype[part]
        return np.memmap(self.file(split, part), dtype=dtype, mode="r")

    def fingerprint(self) -> dict:
        """What a checkpoint records about the data it was trained on, enough to rebuild its Tokenizer."""
        keys = ("tokenizer", "tokenizer_hash", "vocab_size", "dtype", "eot_id", "chars", "chat", "classify", "seq2seq")
        keys += ("source",)
        keys += ("tokenizer_json",)  # a trained BPE's whole tokenizer.json: the checkpoint decodes without the data
        return {k: self.meta.get(k) for k in keys} | {"data_dir": self.data_dir}


def _close_files(files: dict) -> None:
    for f in files.values():
        f.close()
    files.clear()


def _identity(f: BinaryIO) -> tuple[int, ...]:
    """What tells the file opened apart from another put in its place: a replaced file is a new inode."""
    st = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_data(data_dir: str, block_size: int, splits=("train", "val")) -> TokenData:
    """Read and check meta.json and the token files of a prepared dataset."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        name = os.path.basename(os.path.normpath(data_dir))
        if os.path.exists(os.path.join(data_dir, "meta.pkl")) or os.path.exists(os.path.join(data_dir, "train.bin")):
            raise UserError(
                f"{data_dir} is a nanoGPT dataset (its meta.pkl is never unpickled here): run "
                f"`python prepare/from_nanogpt.py {data_dir}` once to describe it, then train"
            )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # engine/ sits in the repository root
        script = os.path.join(root, "prepare", f"{name}.py")
        how = (
            f"python prepare/{name}.py"
            if os.path.isfile(script)
            else f"python prepare/text.py --input=<your files> --out={data_dir}"
        )
        raise UserError(f"no prepared dataset in {data_dir}: run `{how}` first")
    rerun = "re-run the prepare script"
    meta = check(DatasetMeta, read_json(meta_path, rerun), meta_path, rerun)
    itemsize = np.dtype(meta["dtype"]).itemsize
    data = TokenData(data_dir, meta)
    if meta.get("tokenizer") == "tokenizer.json":  # a BPE trained for this dataset, saved beside it
        path = os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json"))
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing; re-run the prepare script")
        meta["tokenizer_json"] = read_text(path, MAX_TOKENIZER_BYTES, rerun)
        if tokenizer_json_hash(meta["tokenizer_json"]) != meta.get("tokenizer_hash"):
            raise UserError(f"{path} is not the tokenizer this dataset was tokenized with; re-run the prepare script")
        check(TokenizerJson, parse_json(meta["tokenizer_json"], path), path, rerun)
    if meta.get("tokenizer") == "char" and meta.get("tokenizer_hash") not in (None, chars_hash(meta.get("chars", ""))):
        raise UserError(f"{meta_path}'s chars do not match its vocabulary hash; re-run the prepare script")
    try:
        for split in splits:
            if split not in meta["splits"]:
                raise UserError(f"{meta_path} has no {split!r} split; re-run the prepare script")
            tokens = meta["splits"][split]["tokens"]
            if not (data.chat or data.classify or data.seq2seq) and tokens < block_size + 1:  # too little
                raise UserError(
                    f"the {split} split of {data_dir} has {tokens} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; lower --block_size or prepare more data"
                )
            check_file(data, split, "file", tokens * itemsize, f"{tokens} {meta['dtype']} tokens")
            if data.chat:
                check_chat_split(data, split)
            if data.classify:
                check_classify_split(data, split)
            if data.seq2seq:
                check_seq2seq_split(data, split)
            check_tokens(data, split)
    except BaseException:
        data.close()
        raise
    return data


def dataset_vocab_size(data_dir: str) -> int:
    """The vocabulary size a prepared dataset records: the model's when a config leaves vocab_size unset."""
    try:
        return load_data(data_dir, 1, splits=()).meta["vocab_size"]
    except UserError as e:
        raise UserError(f"vocab_size is none and the dataset is unreadable ({e}); pass --vocab_size") from None


def check_file(data: TokenData, split: str, part: str, size: int | None, holding: str = "") -> int:
    """Open the split's file (TokenData.file: what is checked here is what batches read), check its size when given
    and the sha256 meta.json records for it when the file is small enough to hash in well under a second. Returns the
    file's size."""
    path = data.split_path(split, part)
    rerun = "re-run the prepare script" if part == "file" or not data.chat else "re-run prepare/chat.py"
    try:
        found = os.fstat(data.file(split, part).fileno()).st_size
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {rerun}") from None
    if size is not None and found != size:
        raise UserError(f"{path} has {found} bytes, expected {size} ({holding}); {rerun}")
    sha256 = data.meta["splits"][split].get(PARTS[part])
    if sha256 and found <= HASH_CHECK_BYTES:
        f = data.file(split, part)
        f.seek(0)
        if hashlib.sha256(f.read()).hexdigest() != sha256:
            raise UserError(f"{path} does not match the sha256 in meta.json; {rerun}")
    return found


def check_chat_split(data: TokenData, split: str) -> None:
    """A chat split's starts run from 0 to the token count, rising, and its mask holds one 0 or 1 per token, as many
    1s as meta.json's trained_tokens; both match their recorded sha256 (check_file). A wrong mask trains on the user's
    turns, or on nothing (a NaN loss), so its values are checked as the token ids are."""
    info = data.meta["splits"][split]
    if not {"mask_file", "starts_file"} <= info.keys():
        raise UserError(f"the {split} split of {data.data_dir} has no mask or starts file; re-run prepare/chat.py")
    check_starts(data, split, "conversation", "re-run prepare/chat.py")
    path = data.split_path(split, "mask_file")
    check_file(data, split, "mask_file", info["tokens"], f"one byte for each of {info['tokens']} tokens")
    mask = data.memmap(split, "mask_file")
    at = first_at_or_above(mask, 2)
    if at is not None:
        raise UserError(
            f"{path} holds {mask[at]} at position {at}, not 0 or 1; the file is damaged: re-run prepare/chat.py"
        )
    ones = int(mask.sum(dtype=np.int64)) if mask.nbytes <= FULL_CHECK_BYTES else None  # as first_at_or_above reads
    if None not in (ones, info.get("trained_tokens")) and ones != info["trained_tokens"]:
        raise UserError(
            f"{path} trains on {ones} tokens, meta.json says {info['trained_tokens']}; re-run prepare/chat.py"
        )


def check_starts(data: TokenData, split: str, what: str, rerun: str, part: str = "starts_file") -> np.ndarray:
    """A split's starts file (part: a seq2seq split's target_starts_file too) runs from 0 to its token count,
    rising (no empty `what`), and matches its recorded sha256 (check_file); returned."""
    info = data.meta["splits"][split]
    total = info["target_tokens"] if part == "target_starts_file" else info["tokens"]
    starts_size = check_file(data, split, part, None)
    path = data.split_path(split, part)
    starts = data.memmap(split, part) if starts_size >= 16 and starts_size % 8 == 0 else None
    if starts is None or starts[0] != 0 or starts[-1] != total:
        raise UserError(f"{path} does not run from 0 to the split's {total} tokens; {rerun}")
    if np.any(np.diff(starts) <= 0):
        raise UserError(f"{path} holds an empty {what}; {rerun}")
    return starts


def check_classify_split(data: TokenData, split: str) -> None:
    """A classification split's starts (check_starts) and one label per text, each an index of meta.json's labels:
    a label out of range would be a device-side assert on CUDA, halfway through a run."""
    info, rerun = data.meta["splits"][split], "re-run prepare/classify.py"
    if not {"labels_file", "starts_file"} <= info.keys():
        raise UserError(f"the {split} split of {data.data_dir} has no labels or starts file; {rerun}")
    texts = len(check_starts(data, split, "text", rerun)) - 1
    check_file(data, split, "labels_file", texts * 8, f"one int64 label for each of {texts} texts")
    labels, n_labels = data.memmap(split, "labels_file"), len(data.classify["labels"])
    bad = np.flatnonzero((labels < 0) | (labels >= n_labels))
    if len(bad):
        raise UserError(
            f"{data.split_path(split, 'labels_file')} holds label {int(labels[bad[0]])} for text {bad[0]}, not one "
            f"of the {n_labels} labels; the file is damaged: {rerun}"
        )


def check_seq2seq_split(data: TokenData, split: str) -> None:
    """A seq2seq split's sources and targets: their starts (check_starts), as many of one as of the other, and the
    target tokens' ids (check_tokens checks the sources')."""
    info, rerun = data.meta["splits"][split], "re-run prepare/seq2seq.py"
    if not {"starts_file", "target_file", "target_starts_file", "target_tokens"} <= info.keys():
        raise UserError(f"the {split} split of {data.data_dir} has no target or starts file; {rerun}")
    sources = len(check_starts(data, split, "source", rerun)) - 1
    check_file(data, split, "target_file", info["target_tokens"] * data.dtype.itemsize, "the target tokens")
    if len(check_starts(data, split, "target", rerun, "target_starts_file")) - 1 != sources:
        raise UserError(f"the {split} split of {data.data_dir} has not as many targets as sources; {rerun}")
    check_tokens(data, split, "target_file")


def check_tokens(data: TokenData, split: str, part: str = "file") -> None:
    """A token file that is damaged (a bad disk, a copy cut short and padded) is refused at load, not halfway through
    a run (or as a device-side assert on CUDA): every id is checked against the vocabulary (first_at_or_above); its
    size and sha256 are check_file's."""
    tokens, vocab_size = data.memmap(split, part), data.meta["vocab_size"]
    at = first_at_or_above(tokens, vocab_size)
    if at is not None:
        raise UserError(
            f"{data.split_path(split, part)} holds token id {int(tokens[at])} at position {at}, outside the vocabulary "
            f"of {vocab_size}; the file is damaged: re-run the prepare script"
        )


def first_at_or_above(array: np.ndarray, limit: int) -> int | None:
    """The position of the first value >= limit, or None; found with a vectorised max over the whole array up to
    FULL_CHECK_BYTES, and beyond that over 64 evenly spread blocks (a damaged region is rarely small)."""
    block = FULL_CHECK_BYTES // array.itemsize // 64
    if array.nbytes <= FULL_CHECK_BYTES:
        starts, block = [0], array.size
    else:
        starts = np.linspace(0, array.size - block, 64, dtype=np.int64).tolist()
    for start in starts:
        part = array[start : start + block]
        if part.size and int(part.max()) >= limit:
            return start + int(np.argmax(part >= limit))
    return None


def train_key(seed: int, iteration: int, global_micro_step: int, rollbacks: int = 0) -> tuple[int, ...]:
    """The seed-sequence key of a training batch. Rank r of W, on micro-step m of M per rank, takes global micro-step
    r * M + m: W ranks with M each read exactly the batches one process with W * M micro-steps reads. After a loss-spike
    rollback the key moves on (rollbacks > 0), so the iterations replayed read other windows."""
    return (seed, 0, iteration, global_micro_step) + ((rollbacks,) if rollbacks else ())


def eval_key(seed: int, k: int) -> tuple[int, ...]:
    """The key of the k-th evaluation batch: the same batches at every evaluation, so val losses compare."""
    return (seed, 1, k)


def get_batch(data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
    """Sample batch_size windows of block_size + 1 tokens at offsets drawn from the seed sequence `key`.
    Returns x (B, T) and y (B, T) int64, y being x shifted left by one token. For a chat dataset see chat_rows: y is
    -1 (ignored by the loss) wherever the mask says not to train."""
    if data.chat:
        xy = torch.from_numpy(np.stack(chat_rows(data, split, batch_size, block_size, key)))  # (2, B, T)
        xy = to_device(xy, device)
        return xy[0], xy[1]
    tokens = data.memmap(split)  # a fresh map of the file checked at load, for this batch only
    rng = np.random.default_rng(list(key))
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)  # every full window, the last included
    windows = np.stack([tokens[i : i + block_size + 1] for i in offsets]).astype(np.int64)  # (B, T+1)
    xy = to_device(torch.from_numpy(windows), device)
    return xy[:, :-1], xy[:, 1:]


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)  # the copy overlaps with the GPU's work
    return t.to(device)


def chat_spans(data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...]) -> list:
    """The (begin, end) token spans of the batch_size conversations the seed sequence `key` draws (with replacement),
    each from its first token and cut at block_size + 1 tokens."""
    starts = data.memmap(split, "starts_file")
    picks = np.random.default_rng(list(key)).integers(0, len(starts) - 1, size=batch_size)
    return [(int(starts[c]), int(min(starts[c + 1], starts[c] + block_size + 1))) for c in picks]


def chat_rows(data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...]):
    """The batch of `key`: one whole conversation per row (chat_spans), padded after its end. Returns x and y, (B, T)
    int64 arrays: y is x shifted by one, with -1 at padding and at every token the mask leaves out (all but the
    assistant's turns)."""
    tokens, mask = data.memmap(split), data.memmap(split, "mask_file")
    rows = np.full((batch_size, block_size + 1), data.meta.get("eot_id") or 0, dtype=np.int64)
    targets = np.full((batch_size, block_size + 1), -1, dtype=np.int64)
    for r, (a, b) in enumerate(chat_spans(data, split, batch_size, block_size, key)):
        ids = tokens[a:b].astype(np.int64)
        rows[r, : b - a] = ids
        targets[r, : b - a] = np.where(mask[a:b] == 1, ids, -1)
    return rows[:, :-1], targets[:, 1:]


def target_count(data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
    """How many targets of the batch `key` the loss counts (y != -1): the whole batch for plain text."""
    if not data.chat:
        return batch_size * block_size
    mask = data.memmap(split, "mask_file")  # the mask alone: no token rows
    return sum(int(mask[a + 1 : b].sum()) for a, b in chat_spans(data, split, batch_size, block_size, key))


def first_targets(data: TokenData, split: str) -> np.ndarray:
    """For each conversation of a chat split, how far into it its first trained token lies (the assistant's first
    token, counted from the conversation's first): a row of block_size tokens learns from the conversation only when
    this is at most block_size. A conversation with no trained token gets int64's max. Read in chunks of whole
    conversations, so memory stays bounded on a large split."""
    starts = np.asarray(data.memmap(split, "starts_file"))
    mask = data.memmap(split, "mask_file")
    first = np.full(len(starts) - 1, np.iinfo(np.int64).max, dtype=np.int64)
    c = 0
    while c < len(first):
        d = min(len(first), max(c + 1, int(np.searchsorted(starts, starts[c] + (64 << 20), side="right")) - 1))
        ones = np.flatnonzero(mask[starts[c] : starts[d]]) + starts[c]  # trained positions of conversations c..d-1
        i = np.searchsorted(ones, starts[c:d] + 1)  # the first after each conversation's first token
        at = ones[np.minimum(i, len(ones) - 1)] if len(ones) else np.zeros(d - c, dtype=np.int64)
        inside = (i < len(ones)) & (at < starts[c + 1 : d + 1])
        first[c:d][inside] = (at - starts[c:d])[inside]
        c = d
    return first


class Tokenizer:
    """encode/decode for the tokenizer named in meta.json: "char" (the characters listed in meta) or a tiktoken
    encoding such as "gpt2" (offline: TIKTOKEN_CACHE_DIR, or tokenizer_dir holding GPT-2's vocab.bpe and
    encoder.json). A tokenizer whose vocabulary hash differs from the one recorded in meta is refused."""

    def __init__(self, meta: dict, tokenizer_dir: str | None = None):
        self.name = meta["tokenizer"]
        self.hash = meta.get("tokenizer_hash")
        self.eot_id = meta.get("eot_id")
        # a chat dataset's special tokens (engine/chat.py): ids past the base vocabulary, which text never encodes to
        self.chat = meta.get("chat")
        self.special = dict((self.chat or meta.get("seq2seq") or {}).get("special", {}))  # (seq2seq: <pad>, </s>)
        self.special_by_id = {i: token for token, i in self.special.items()}
        if self.name == "tokenizer.json":  # a trained BPE (its JSON in meta), or a Hugging Face directory's own
            text, where = meta.get("tokenizer_json"), "the tokenizer.json recorded with the data"
            text, where = (text, where) if text else (read_text(meta["path"], MAX_TOKENIZER_BYTES), meta["path"])
            self.hf = specials_as_text(tokenizer_from_json(text, where))
            self.eot_id = self.hf.token_to_id(ENDOFTEXT)
            decoder = json.loads(self.hf.to_str()).get("decoder") or {}
            self.byte_level = decoder.get("type") == "ByteLevel"
            if self.byte_level:
                self.unspell = {c: b for b, c in byte_to_unicode().items()}
            return
        if self.name == "char":
            self.itos = list(meta["chars"])
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
            found = chars_hash(meta["chars"])
        else:
            try:
                self.enc = load_encoding(self.name, tokenizer_dir)
            except TokenizerUnavailable as e:
                raise UserError(str(e)) from None
            found = encoding_hash(self.enc)
        if meta.get("tokenizer_hash") not in (None, found):
            raise UserError(
                f"the {self.name} tokenizer found here differs from the one the data was prepared with "
                "(vocabulary hash mismatch); use the same tokenizer files"
            )

    @property
    def vocab_size(self) -> int:
        """Ids 0..vocab_size-1 decode; a model's vocabulary may be larger (rounded up for speed), never smaller."""
        if self.name == "tokenizer.json":  # (special tokens past its own: a seq2seq dataset's)
            return max(self.hf.get_vocab_size(), 1 + max(self.special.values(), default=-1))
        return (len(self.itos) if self.name == "char" else self.enc.n_vocab) + len(self.special)

    def encode(self, text: str) -> list[int]:
        if self.name == "tokenizer.json":
            return self.hf.encode(text, add_special_tokens=False).ids
        if self.name == "char":
            missing = sorted(set(text) - self.stoi.keys())
            if missing:
                raise UserError(f"characters {''.join(missing)!r} are not in this dataset's vocabulary")
            return [self.stoi[c] for c in text]
        # "<|endoftext|>" written in a prompt is text, as in prepare's documents: only our code inserts the id
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        if self.special_by_id:  # the text between special tokens decodes as a whole (a character may span tokens)
            parts, run = [], []
            for i in ids:
                if i in self.special_by_id:
                    parts += [self._decode(run), self.special_by_id[i]]
                    run = []
                else:
                    run.append(i)
            return "".join([*parts, self._decode(run)])
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        if self.name == "tokenizer.json":
            return self.hf.decode(ids, skip_special_tokens=False)
        if self.name == "char":
            return "".join(self.itos[i] for i in ids)
        return self.enc.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes of one token: a BPE token may hold part of a character."""
        if token_id in self.special_by_id:
            return self.special_by_id[token_id].encode("utf-8")
        if self.name == "tokenizer.json":
            token = self.hf.id_to_token(token_id)
            if self.byte_level and token_id not in self.hf.get_added_tokens_decoder():
                return bytes(self.unspell[c] for c in token)
            return self.hf.decode([token_id], skip_special_tokens=False).encode("utf-8")
        if self.name == "char":
            return self.itos[token_id].encode("utf-8")
        return self.enc.decode_single_token_bytes(token_id)


def check_chat_coverage(data, block_size: int, log) -> None:
    """A chat row learns only from assistant tokens within its first block_size: refuse a train split where no
    conversation has one, and say so when most have none (their batches train nothing) or the val split has none
    (its evaluations have no loss)."""
    for split in ("train", "val"):
        first = first_targets(data, split)
        share = float(np.mean(first <= block_size))
        if split == "train" and share == 0:
            raise UserError(
                f"no conversation of {data.data_dir}'s train split has an assistant token within block_size="
                f"{block_size} (the nearest is {first.min():,} tokens in); raise --block_size"
            )
        if share < 0.5:
            log(
                f"note: only {share:.0%} of the {split} split's conversations have an assistant token within "
                f"block_size={block_size}; the rest teach nothing{' and evaluate to no loss' if split == 'val' else ''}"
                f" (raise --block_size to {int(np.quantile(first, 0.5)):,} for half of them)"
            )


def chat_tokens_from(data) -> int:
    """The first id of a chat dataset's template tokens: they follow the tokenizer's own vocabulary."""
    return min(data.chat["special"].values())
