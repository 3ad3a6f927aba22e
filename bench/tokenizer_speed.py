"""Tokenization throughput of a BPE trained here (prepare/text.py --tokenizer=bpe) next to tiktoken's GPT-2 encoding,
on the same text, in the same process.

    python bench/tokenizer_speed.py                                        # tiny-shakespeare, an 8192-id BPE
    python bench/tokenizer_speed.py --input=corpus.txt --bpe_vocab_size=32768 --repeat=20

The BPE is trained with engine/tokenization.train_bpe on the text's lines (timed too), then both tokenizers encode
the text's lines as one batch (tiktoken's encode_ordinary_batch, the `tokenizers` library's encode_batch: both run
their Rust cores on every core), after one warm-up pass each. It prints MB/s of UTF-8 text, tokens per byte (lower
packs more text into each id) and the BPE/tiktoken speed ratio. Offline, tiktoken needs TIKTOKEN_CACHE_DIR; without
it only the BPE is measured.
"""

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

from engine.configurator import parse_config
from engine.errors import UserError, run_cli
from engine.tokenization import TokenizerUnavailable, load_encoding, train_bpe

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared")


@dataclass
class TokenizerSpeedConfig:
    input: str = os.path.join(SHARED, "data", "tinyshakespeare.txt")  # a UTF-8 text file
    bpe_vocab_size: int = 8192  # the trained BPE's vocabulary
    repeat: int = 5  # the text is encoded this many times per measurement (more: steadier figures)


def throughput(encode_batch, lines: list[str], repeat: int) -> tuple[float, int]:
    """(seconds per pass, tokens) of encoding `lines` as one batch, after a warm-up pass."""
    tokens = sum(len(ids) for ids in encode_batch(lines))
    t0 = time.perf_counter()
    for _ in range(repeat):
        encode_batch(lines)
    return (time.perf_counter() - t0) / repeat, tokens


def main(argv=None):
    cfg = parse_config(TokenizerSpeedConfig, argv, usage=__doc__)
    try:
        with open(cfg.input, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines(keepends=True) if line]
    except OSError as e:
        raise UserError(f"cannot read --input={cfg.input} ({e.strerror})") from None
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    t0 = time.perf_counter()
    bpe = train_bpe(lines, cfg.bpe_vocab_size, length=len(lines))
    trained = time.perf_counter() - t0
    vocab = cfg.bpe_vocab_size
    print(f"{n_bytes / 1e6:.2f} MB of text, {len(lines):,} lines; a {vocab:,}-id BPE trained in {trained:.1f} s")

    def bpe_batch(texts):
        return [e.ids for e in bpe.encode_batch(texts, add_special_tokens=False)]

    rows = [("trained BPE", *throughput(bpe_batch, lines, cfg.repeat))]
    try:
        enc = load_encoding("gpt2")
        rows.append(("tiktoken gpt2", *throughput(enc.encode_ordinary_batch, lines, cfg.repeat)))
    except TokenizerUnavailable as e:
        print(f"tiktoken not measured: {e}")
    for name, seconds, tokens in rows:
        print(
            f"{name:<14} {n_bytes / seconds / 1e6:8.2f} MB/s  {tokens / n_bytes:.3f} tokens/byte  ({tokens:,} tokens)"
        )
    if len(rows) == 2:
        print(f"BPE / tiktoken speed: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
