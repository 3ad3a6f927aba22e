"""The encoder-decoder's tiny recipe: strings of lowercase letters and their reversals (x-transformers' copy task,
reversed), the classic check that an encoder-decoder works end to end.

    python prepare/reverse.py                               # writes data/reverse/ (5,000 training pairs)
    python train.py config/train_reverse.py                 # then: exact match on the held-out strings

Each source is 4 to 12 random lowercase letters, its target the same letters backwards. Validation strings never
occur in training. The pairs go to <out>/{train,val}.jsonl, then through prepare/seq2seq.py with a character
vocabulary.
"""

import json
import os
import random
import string
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import seq2seq

from engine.configurator import parse_config
from engine.errors import run_cli
from engine.files import write_file


@dataclass
class ReverseConfig:
    out: str = os.path.join("data", "reverse")  # dataset directory
    n_train: int = 5000  # training pairs
    n_val: int = 500  # validation pairs, strings never in training
    min_length: int = 4  # shortest string
    max_length: int = 12  # longest string
    seed: int = 2357  # seed of the strings

    def __post_init__(self):
        if self.n_train < 2 or self.n_val < 1 or not 1 <= self.min_length <= self.max_length:
            raise ValueError("--n_train must be >= 2, --n_val >= 1 and 1 <= --min_length <= --max_length")


def main(argv=None):
    args = parse_config(ReverseConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    rng, seen, rows = random.Random(args.seed), set(), {"train": [], "val": []}
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        while len(rows[split]) < n:
            text = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(args.min_length, args.max_length)))
            if text not in seen:
                seen.add(text)
                rows[split].append({"source": text, "target": text[::-1]})
    os.makedirs(args.out, exist_ok=True)
    files = {split: os.path.join(args.out, f"{split}.jsonl") for split in rows}
    for split, path in files.items():
        write_file(path, "".join(json.dumps(row) + "\n" for row in rows[split]))
    flags = [f"--input={files['train']}", f"--val_input={files['val']}", "--tokenizer=char"]
    return seq2seq.main([*flags, f"--out={args.out}"])


if __name__ == "__main__":
    run_cli(main)
