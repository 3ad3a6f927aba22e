"""Tokenization throughput: prepare/text.py's path against the per-document map of nanoGPT's openwebtext script.

    TIKTOKEN_CACHE_DIR=... python bench/prepare_throughput.py --input=data/shakespeare_char/input.txt --mb=100

Builds a corpus of about --mb megabytes by repeating the input text, one document per blank-line paragraph, then
runs both pipelines from the same in-memory `datasets.Dataset` to finished train.bin files, with the same number of
processes, in the same run, and prints MB/s for each and their ratio.
  - ours: batched map, tiktoken's multi-threaded encode_ordinary_batch, one Arrow row per 1000 documents, then a
    streamed write (prepare/text.py's tokenize + token_writer.DatasetWriter.write_split).
  - nanoGPT-style: one `encode_ordinary` call and one Arrow row per document, then a concatenating write into a
    np.memmap in shards (written here from the description of nanoGPT's data/openwebtext/prepare.py).
"""

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prepare"))  # the prepare modules
import text  # noqa: E402
from token_writer import DatasetWriter  # noqa: E402

from engine.configurator import parse_config
from engine.errors import run_cli


def nanogpt_style(ds, enc, out_dir, num_proc):
    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = ds.map(process, remove_columns=["text"], num_proc=num_proc, desc="nanoGPT-style tokenizing")
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(os.path.join(out_dir, "train.bin"), dtype=np.uint16, mode="w+", shape=(total,))
    idx, shards = 0, 64
    for i in range(shards):
        batch = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
        chunk = np.concatenate(batch["ids"])
        arr[idx : idx + len(chunk)] = chunk
        idx += len(chunk)
    arr.flush()
    return total


def ours(ds, out_dir, num_proc):
    args = text.parse_args(["--input=x", f"--out={out_dir}", f"--num_proc={num_proc}"])
    encode_batch, info = text.make_tokenizer(args, ds)
    tokens = text.tokenize(ds, encode_batch, args, "ours tokenizing")
    with DatasetWriter(out_dir) as writer:  # staged, then discarded: the write is what is timed
        return writer.write_split("train", text.chunks(tokens), info["vocab_size"])["tokens"]


@dataclass
class ThroughputConfig:
    input: str = "data/shakespeare_char/input.txt"  # the text to repeat into a corpus
    mb: float = 100.0  # corpus size in MB
    num_proc: int = os.cpu_count() or 1  # tokenizing processes


def main(argv=None):
    args = parse_config(ThroughputConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    import datasets
    import tiktoken

    datasets.disable_caching()
    with open(args.input, encoding="utf-8") as f:
        paragraphs = [d for d in f.read().split("\n\n") if d]
    per_copy = sum(len(d.encode()) for d in paragraphs)
    docs = paragraphs * max(1, round(args.mb * 1e6 / per_copy))
    nbytes = per_copy * (len(docs) // len(paragraphs))
    ds = datasets.Dataset.from_dict({"text": docs})
    enc = tiktoken.get_encoding("gpt2")
    print(f"corpus: {len(docs):,} documents, {nbytes / 1e6:.1f} MB; {args.num_proc} processes; {os.cpu_count()} CPUs")
    results = {}
    for name, run in (
        ("nanoGPT-style", lambda d: nanogpt_style(ds, enc, d, args.num_proc)),
        ("ours", lambda d: ours(ds, d, args.num_proc)),
    ):
        out = tempfile.mkdtemp()
        t0 = time.perf_counter()
        tokens = run(out)
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        results[name] = (tokens, dt)
        print(f"{name:>14}: {tokens:,} tokens in {dt:.1f} s = {nbytes / 1e6 / dt:.2f} MB/s")
    assert results["ours"][0] == results["nanoGPT-style"][0], "both pipelines must produce the same token count"
    print(f"speed-up: {results['nanoGPT-style'][1] / results['ours'][1]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
