"""Conversations -> a chat dataset: tokens, the assistant-only loss mask and the conversation boundaries.

    python prepare/chat.py --input=conversations.jsonl --out=data/chat                  # GPT-2's tokenizer
    python prepare/chat.py --input=conversations.jsonl --tokenizer=char --out=data/chat_char
    python prepare/chat.py --input=HuggingFaceTB/smoltalk --config=everyday-conversations --out=data/smoltalk

One conversation per row, in the `messages` format of Hugging Face chat datasets and fine-tuning APIs:
{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}, from a local .jsonl, .json or
.parquet file or a hub dataset. Each is rendered with the chat template of engine/chat.py, whose special tokens get
ids past the tokenizer's vocabulary. Writes <out>/{train,val}.bin (token ids), {train,val}.mask.bin (uint8, 1 where
a token is trained on: the assistant's turns), {train,val}.starts.bin (int64 conversation starts, then the end) and
meta.json, which records the template and the special tokens' ids. `--val_fraction` holds out whole conversations.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
from table import read_columns
from token_writer import DatasetWriter, fail
from tqdm import tqdm

from engine import chat
from engine.configurator import parse_config
from engine.errors import run_cli
from engine.tokenization import (
    TokenizerUnavailable,
    char_encode,
    char_lookup,
    chars_hash,
    tiktoken_manifest,
)


@dataclass
class ChatConfig:
    input: str = ""  # a .jsonl, .json or .parquet file of conversations, or a hub dataset name
    out: str = ""  # dataset directory, e.g. data/<name>
    messages_column: str = "messages"  # the column holding each conversation's list of messages
    config: str | None = None  # hub dataset configuration name
    split: str = "train"  # split to read (hub datasets)
    val_fraction: float = 0.1  # share of conversations held out for validation (at least one)
    tokenizer: str = "gpt2"  # gpt2, any tiktoken encoding name, or char (the conversations' own characters)
    tokenizer_dir: str | None = None  # directory with GPT-2's vocab.bpe and encoder.json (offline)
    block_size: int = 1024  # longest conversation in tokens; train with at least this block_size to see them whole
    on_long: str = "truncate"  # a longer conversation: truncate (keep its first block_size tokens), drop, or error
    seed: int = 2357  # seed of the random validation split
    cache_dir: str | None = None  # datasets cache directory (default: datasets' own)

    def __post_init__(self):
        if not self.input:
            raise ValueError("--input is needed: a .jsonl/.json/.parquet file or a hub dataset name")
        if not self.out:
            raise ValueError("--out is needed: the dataset directory, e.g. --out=data/chat")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.on_long not in ("truncate", "drop", "error"):
            raise ValueError(f"--on_long must be truncate, drop or error, got {self.on_long!r}")
        if self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2, got {self.block_size}")


def read_rows(args: ChatConfig) -> tuple[list, str]:
    """(rows, source): each row's messages, from a local file or the hub."""
    if os.path.isfile(args.input) and os.path.splitext(args.input)[1].lower() not in (".jsonl", ".json", ".parquet"):
        fail(f"{args.input}: give a .jsonl, .json or .parquet file")
    columns, source = read_columns(args.input, [args.messages_column], args.config, args.split, args.cache_dir)
    return columns[args.messages_column], source


def make_tokenizer(args: ChatConfig, conversations: list[list[dict]]):
    """(encode, tokenizer manifest entry with the chat template and its special tokens)."""
    if args.tokenizer == "char":
        chars = "".join(sorted({c for conv in conversations for m in conv for c in m["content"]}))
        table = char_lookup(chars)
        info = {"tokenizer": "char", "tokenizer_hash": chars_hash(chars), "eot_id": None, "chars": chars}
        base, encode = len(chars), lambda text: char_encode(text, table).tolist()
    else:
        try:
            enc, info = tiktoken_manifest(args.tokenizer, args.tokenizer_dir)
        except TokenizerUnavailable as e:
            fail(str(e))
        base, encode = enc.n_vocab, enc.encode_ordinary  # "<|endoftext|>" or "<|user|>" in a message stays text
    special = chat.special_ids(base)
    info |= {"vocab_size": base + len(special), "chat": {"template": chat.TEMPLATE, "special": special}}
    return encode, info


def main(argv=None):
    args = parse_config(ChatConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    rows, source = read_rows(args)
    conversations = []
    for n, row in enumerate(rows, 1):
        try:
            conversations.append(chat.check_messages(row))
        except ValueError as e:
            fail(f"row {n} of {args.input}: {e}")
    if len(conversations) < 2:
        fail(f"{args.input} holds {len(conversations)} conversation(s); a train and a val split need at least 2")
    encode, tokenizer = make_tokenizer(args, conversations)
    rendered, truncated, dropped, unreachable = [], 0, 0, 0
    for n, conv in enumerate(tqdm(conversations, desc="rendering", unit="conv"), 1):
        ids, mask = chat.render(conv, encode, tokenizer["chat"]["special"])
        if len(ids) > args.block_size:
            if args.on_long == "error":
                fail(f"row {n} of {args.input} is {len(ids)} tokens, longer than --block_size={args.block_size}")
            ids, mask = ids[: args.block_size], mask[: args.block_size]
            if args.on_long == "drop" or not any(mask):  # nothing of the assistant's would be left to learn
                dropped += 1
                unreachable += not any(mask)
                continue
            truncated += 1
        rendered.append((ids, mask))
    if len(rendered) < 2:
        fail(f"fewer than 2 conversations fit --block_size={args.block_size}; raise it or use --on_long=truncate")
    order = np.random.default_rng(args.seed).permutation(len(rendered))
    n_val = max(1, round(len(rendered) * args.val_fraction))
    parts = {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}
    with DatasetWriter(args.out) as writer:  # the previous dataset stays until the new one is complete
        splits = {}
        for split, picks in parts.items():
            ids = np.concatenate([np.asarray(rendered[i][0], dtype=np.int64) for i in picks])
            mask = np.concatenate([np.asarray(rendered[i][1], dtype=np.uint8) for i in picks])
            starts = np.cumsum([0] + [len(rendered[i][0]) for i in picks], dtype=np.int64)
            splits[split] = writer.write_split(split, [ids], tokenizer["vocab_size"], total=len(ids))
            splits[split] |= {"documents": len(picks), "trained_tokens": int(mask.sum())}
            for part, array in (("mask", mask), ("starts", starts)):
                splits[split][f"{part}_file"] = f"{split}.{part}.bin"
                splits[split][f"{part}_sha256"] = writer.write_array(f"{split}.{part}.bin", array)
        meta = writer.commit(tokenizer, source, splits)
    print(f"{len(rendered):,} conversations, a vocabulary of {tokenizer['vocab_size']:,} (chat tokens included)")
    if truncated or dropped:
        print(f"{truncated} conversation(s) truncated and {dropped} dropped at --block_size={args.block_size}")
    for split, info in splits.items():
        share = info["trained_tokens"] / info["tokens"]
        print(f"{split}: {info['documents']:,} conversations, {info['tokens']:,} tokens ({share:.0%} trained on)")
    # a training row learns only from assistant tokens within its first block_size: say how far in they start
    reach = np.array([first_target(mask) for _, mask in rendered])
    half, most = int(np.median(reach)), int(np.quantile(reach, 0.9))
    print(
        f"the assistant's first token is within the first {half:,} tokens in half the conversations, {most:,} in 90% "
        f"and {int(reach.max()):,} in all: train with --block_size at least that (train.py names those it leaves out)"
    )
    if unreachable > len(conversations) / 2:
        print(
            f"warning: {unreachable} of {len(conversations)} conversations were dropped for leaving no assistant "
            f"token within --block_size={args.block_size}; raise it to keep them"
        )
    return meta


def first_target(mask: list[int]) -> int:
    """How far into a conversation its first trained token lies (counted from its first token, which is never a
    target): a row of block_size tokens learns from the conversation when this is at most block_size."""
    return next((i for i, m in enumerate(mask) if m and i > 0), len(mask))


if __name__ == "__main__":
    run_cli(main)
