"""Any text source -> token files: local files or a Hugging Face hub dataset, through `datasets` and tiktoken.

    python prepare/text.py --input="books/*.txt" --out=data/books                       # one document per file
    python prepare/text.py --input=corpus.jsonl --text_column=body --out=data/corpus     # also .json .parquet .csv
    python prepare/text.py --input=notes.txt --tokenizer=char --out=data/notes_char      # a character vocabulary
    python prepare/text.py --input=Skylion007/openwebtext --val_fraction=0.0005 --out=data/openwebtext   # the hub

Each document is tokenized and followed by one end-of-text token (BPE tokenizers; a character vocabulary has none),
the only one: "<|endoftext|>" written in a document is ordinary text, whatever the tokenizer.
Validation data is a `--val_split` of a hub dataset or a random `--val_fraction` of the documents; a source with a
single document is split by tokens instead. Writes <out>/train.bin, val.bin and meta.json (see engine/data.py).
"""

import glob
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from token_writer import DatasetWriter, check_source_file, fail, first_invalid_utf8

from engine.configurator import parse_config
from engine.errors import run_cli
from engine.tokenization import (
    ENDOFTEXT,
    TokenizerUnavailable,
    char_encode,
    char_lookup,
    chars_hash,
    read_tokenizer_json,
    specials_as_text,
    tiktoken_manifest,
    tokenizer_json_hash,
    train_bpe,
)

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TextConfig:
    input: str = ""  # local files or globs (several: separated by commas), or a hub dataset name
    out: str = ""  # dataset directory, e.g. data/<name>
    text_column: str = "text"  # column holding the text (.jsonl/.json/.parquet/.csv/hub)
    sample_by: str = "document"  # .txt files: one document per file (document), per blank-line paragraph or per line
    config: str | None = None  # hub dataset configuration name
    split: str = "train"  # split to read (hub datasets)
    val_split: str | None = None  # hub split to use for validation instead of val_fraction
    val_fraction: float = 0.1  # share of documents held out for validation
    max_documents: int | None = None  # use only the first N documents
    tokenizer: str = "gpt2"  # gpt2 or another tiktoken encoding, char, bpe (train one), or a tokenizer.json to reuse
    bpe_vocab_size: int = 8192  # with tokenizer=bpe: the trained vocabulary's size, <|endoftext|> included
    tokenizer_dir: str | None = None  # directory with GPT-2's vocab.bpe and encoder.json (offline)
    num_proc: int = min(8, os.cpu_count() or 1)  # tokenizing processes
    seed: int = 2357  # seed of the random validation split
    cache_dir: str | None = None  # datasets cache directory (default: datasets' own)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("--input is needed: files, globs or a hub dataset name, e.g. --input='books/*.txt'")
        if not self.out:
            raise ValueError("--out is needed: the dataset directory, e.g. --out=data/books")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_proc < 1:
            raise ValueError(f"--num_proc must be >= 1, got {self.num_proc}")
        if self.tokenizer == "bpe" and not 257 <= self.bpe_vocab_size <= 2**20:
            raise ValueError(
                f"--bpe_vocab_size must be in 257..1048576 (256 bytes + <|endoftext|>), got {self.bpe_vocab_size}"
            )
        if self.sample_by not in ("document", "paragraph", "line"):
            raise ValueError(f"--sample_by must be document, paragraph or line, got {self.sample_by!r}")

    @property
    def inputs(self) -> list[str]:
        return [p.strip() for p in self.input.split(",") if p.strip()]


def parse_args(argv=None) -> TextConfig:
    return parse_config(TextConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)


def load_source(args):
    """(train, val or None, description) as datasets.Dataset objects with one `text` column."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become our one-line messages
    files = sorted({f for pattern in args.inputs for f in glob.glob(os.path.expanduser(pattern))})
    try:
        if files:
            exts = {os.path.splitext(f)[1].lower() for f in files}
            builders = {BUILDERS.get(e) for e in exts}
            if None in builders or len(builders) != 1:
                fail(f"input files must all be one of {', '.join(BUILDERS)}; got {', '.join(sorted(exts))}")
            builder = builders.pop()
            if all(os.path.getsize(f) == 0 for f in files):
                fail(f"{' '.join(files)[:300]} {'is' if len(files) == 1 else 'are'} empty; give a file with text")
            if builder != "parquet":  # text is checked before a parser sees it (Parquet's strings once loaded)
                for f in files:
                    check_source_file(f)
            kwargs = {"sample_by": args.sample_by} if builder == "text" else {}
            try:
                train = datasets.load_dataset(
                    builder, data_files=files, split="train", cache_dir=args.cache_dir, **kwargs
                )
            except datasets.exceptions.DatasetGenerationError:
                if builder == "json":
                    _fail_at_bad_json(files)
                raise
            val, source = None, f"{len(files)} local {builder} file(s): {', '.join(files[:3])}"[:500]
        elif len(args.inputs) == 1 and not os.path.exists(args.inputs[0]) and "*" not in args.inputs[0]:
            name = args.inputs[0]
            train = datasets.load_dataset(name, args.config, split=args.split, cache_dir=args.cache_dir)
            val = None
            if args.val_split:
                val = datasets.load_dataset(name, args.config, split=args.val_split, cache_dir=args.cache_dir)
            source = f"hub dataset {name}" + (f" ({args.config})" if args.config else "") + f", split {args.split}"
        else:
            fail(f"no input files match {' '.join(args.inputs)}")
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
        fail(f"could not read {' '.join(args.inputs)}: {str(e).splitlines()[0][:300]}")
    if args.text_column not in train.column_names:
        fail(
            f"no column {args.text_column!r} in {' '.join(args.inputs)} (columns: {', '.join(train.column_names)}); "
            "set --text_column"
        )
    train = _text_only(train, args.text_column)
    val = _text_only(val, args.text_column) if val is not None else None
    for split, ds in (("train", train), ("val", val)):
        if ds is not None:
            _check_text(
                ds, f"{'input' if split == 'train' else 'val split of'} {' '.join(args.inputs)[:200]}", args.text_column
            )
    if args.max_documents is not None:
        train = train.select(range(min(args.max_documents, len(train))))
    return train, val, source


def _fail_at_bad_json(files: list[str]):
    """Name the first line that is not a JSON object (datasets only says that generating the dataset failed)."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    fail(f"{path}:{n}: not valid JSON ({e}); fix or remove that line")
                if not isinstance(row, dict):
                    fail(f'{path}:{n}: a JSON line must be an object like {{"text": ...}}, got {type(row).__name__}')


def _check_text(ds, what: str, column: str):
    """Every row holds a string, and there is some text at all; else one line naming the first bad row."""
    import pyarrow as pa  # datasets' own columnar format
    import pyarrow.compute as pc

    col = ds.data.column("text")
    if len(ds) == 0:
        fail(f"the {what} has no rows; give a file with text")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        values = ds["text"]
        if all(v is None for v in values):  # what a CSV reader makes of a column of empty strings
            fail(f"the {what} holds no text (every row is empty)")
        bad = next(i for i, t in enumerate(values) if not isinstance(t, str))
        if values[bad] is None:
            fail(f"row {bad + 1} of the {what} has no text (empty or null in column {column!r}); drop it or fill it in")
        fail(f"row {bad + 1} of the {what} holds {values[bad]!r} in column {column!r}, not text")
    bad = first_invalid_utf8(col)  # a Parquet file or a hub dataset may hold any bytes
    if bad is not None:
        fail(f"row {bad + 1} of the {what} is not UTF-8 text (column {column!r}); convert it, e.g. iconv -t UTF-8")
    if col.null_count:
        bad = pc.index(pc.is_null(col), True).as_py()
        fail(f"row {bad + 1} of the {what} has no text (null in column {column!r}); drop it or fill it in")
    if pc.sum(pc.utf8_length(col)).as_py() in (0, None):
        fail(f"the {what} holds no text (every row is empty)")


def _text_only(ds, column: str):
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def make_tokenizer(args, train, val=None):
    """(encode_batch(list[str]) -> list[np.ndarray], tokenizer manifest entry). A trained or reused BPE's
    tokenizer.json text is in the entry as "tokenizer_json", for main() to save beside the dataset."""
    if args.tokenizer == "bpe" or args.tokenizer.endswith(".json"):
        return bpe_tokenizer(args, train)
    if args.tokenizer == "char":
        # The vocabulary is every character of the whole text, train and validation splits alike (as
        # prepare/shakespeare_char.py): a character only the val split holds must encode, and the vocabulary must
        # not depend on how --seed split the documents.
        chars = set()
        for ds in (train, val) if val is not None else (train,):
            found = ds.map(
                lambda b: {"chars": ["".join(set("".join(b["text"])))]},
                batched=True,
                batch_size=1000,
                remove_columns=["text"],
                num_proc=_procs(args, ds),
                desc="finding characters",
            )
            chars |= set("".join(found["chars"]))
        chars = "".join(sorted(chars))
        table = char_lookup(chars)
        info = {
            "tokenizer": "char",
            "tokenizer_hash": chars_hash(chars),
            "vocab_size": len(chars),
            "eot_id": None,
            "chars": chars,
        }
        return (lambda texts: [char_encode(t, table) for t in texts]), info
    try:
        enc, info = tiktoken_manifest(args.tokenizer, args.tokenizer_dir)
    except TokenizerUnavailable as e:
        fail(str(e))
    eot = info["eot_id"]

    def encode_batch(texts):
        # tiktoken's batch encoding runs its Rust core on several threads; special tokens in the text stay text.
        return [np.append(np.asarray(ids, dtype=np.int64), eot) for ids in enc.encode_ordinary_batch(texts)]

    return encode_batch, info


def bpe_tokenizer(args, train):
    """Train a byte-level BPE on the train split (streamed, in batches of 1000 documents), or read a tokenizer.json."""
    if args.tokenizer == "bpe":
        texts = (batch["text"] for batch in train.iter(batch_size=1000))
        tokenizer = train_bpe(texts, args.bpe_vocab_size, length=len(train))
        text = tokenizer.to_str()
    else:  # checked before the library reads it: a hostile file is one line, not a Rust panic (engine/schemas.py)
        text, tokenizer = read_tokenizer_json(args.tokenizer)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    if eot is None:
        fail(f"{args.tokenizer} has no {ENDOFTEXT} token to end documents with; add it as a special token")
    info = {
        "tokenizer": "tokenizer.json",
        "tokenizer_file": "tokenizer.json",
        "tokenizer_hash": tokenizer_json_hash(text),
    }
    info |= {"vocab_size": tokenizer.get_vocab_size(), "eot_id": eot, "tokenizer_json": text}
    info["special_tokens"] = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # worker processes encode one batch each, single-threaded

    def encode_batch(texts):
        # "<|endoftext|>" written in a document is text, as with tiktoken's encode_ordinary: the appended id is the only
        # boundary. Set here, in the worker: a pickled tokenizer (each worker process's copy) forgets the setting.
        out = specials_as_text(tokenizer).encode_batch(texts, add_special_tokens=False)
        return [np.append(np.asarray(e.ids, dtype=np.int64), eot) for e in out]

    return encode_batch, info


def _procs(args, ds) -> int | None:
    return min(args.num_proc, max(1, len(ds) // 1000)) if args.num_proc > 1 and len(ds) >= 2000 else None


def tokenize(ds, encode_batch, args, desc):
    """One output row per batch of 1000 documents: their token ids concatenated, with document and byte counts.
    Fewer, larger rows keep Arrow's per-row overhead off the hot path."""

    def fn(batch):
        ids = encode_batch(batch["text"])
        nbytes = sum(len(t.encode("utf-8")) for t in batch["text"])
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        return {"ids": [ids], "tokens": [len(ids)], "documents": [len(batch["text"])], "bytes": [nbytes]}

    return ds.map(
        fn, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=_procs(args, ds), desc=desc
    )


def chunks(tokens_ds):
    for row in tokens_ds.with_format("numpy").iter(batch_size=16):
        yield from row["ids"]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    train, val, source = load_source(args)
    if val is None and args.val_fraction > 0 and len(train) >= 2:
        n_val = max(1, round(len(train) * args.val_fraction))
        parts = train.train_test_split(test_size=n_val, seed=args.seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    encode_batch, tokenizer = make_tokenizer(args, train, val)
    with DatasetWriter(args.out) as writer:  # the previous dataset stays until the new one is complete
        splits, total_bytes = {}, 0
        if "tokenizer_json" in tokenizer:  # the BPE goes beside the data, staged with it
            writer.write_bytes("tokenizer.json", tokenizer.pop("tokenizer_json").encode("utf-8"))
        if val is None and args.val_fraction > 0:  # a single document: split its tokens
            tokens = tokenize(train, encode_batch, args, "tokenizing")
            ids = np.concatenate(list(chunks(tokens)))
            cut = int(len(ids) * (1 - args.val_fraction))
            total_bytes = sum(tokens["bytes"])
            for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
                splits[split] = writer.write_split(split, [part], tokenizer["vocab_size"], total=len(part))
                splits[split]["documents"] = 1
        else:
            for split, ds in (("train", train), ("val", val)):
                if ds is None:
                    continue
                tokens = tokenize(ds, encode_batch, args, f"tokenizing {split}")
                total = int(sum(tokens["tokens"]))
                splits[split] = writer.write_split(split, chunks(tokens), tokenizer["vocab_size"], total=total)
                splits[split]["documents"] = int(sum(tokens["documents"]))
                total_bytes += int(sum(tokens["bytes"]))
        meta = writer.commit(tokenizer, source, splits)
    dt = time.time() - t0
    docs = len(train) + (len(val) if val is not None else 0)
    toks = sum(s["tokens"] for s in splits.values())
    print(
        f"{docs:,} documents, {toks:,} tokens ({meta['dtype']}), {total_bytes / 1e6:.1f} MB of text in {dt:.1f} s "
        f"= {total_bytes / 1e6 / dt:.2f} MB/s -> {args.out}"
    )
    for split, info in splits.items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens -> {info['file']}")
    return meta


if __name__ == "__main__":
    run_cli(main)
