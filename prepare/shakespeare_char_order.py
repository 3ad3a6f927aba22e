"""A labelled set for the encoder recipe: is a line of tiny-shakespeare as written, or are its words shuffled?

    python prepare/shakespeare_char.py          # first: the text, and the character vocabulary the encoder reads
    python prepare/shakespeare_char_order.py    # writes data/shakespeare_char_order/ (labels: real, shuffled)

Telling the two apart takes knowing how the language runs, which is what a masked-language model learns: the
classifier of config/finetune_shakespeare_char_order.py starts from the encoder of
config/train_shakespeare_char_bert.py. Lines of at least --min_words words (not a speaker's name) are taken; each is
kept as written or has its words shuffled, with even odds. Training rows come from the text's first 90%, the part
prepare/shakespeare_char.py trains on; validation rows from its last 10%, which neither the encoder nor the
classifier ever reads. The rows go to <out>/{train,val}.jsonl, then through prepare/classify.py with the character
vocabulary of data/shakespeare_char.
"""

import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: the engine package
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import classify
from token_writer import TINY_SHAKESPEARE_URL, fail, read_or_download

from engine.configurator import parse_config
from engine.data import load_data
from engine.errors import run_cli
from engine.files import write_file


@dataclass
class OrderConfig:
    out: str = os.path.join("data", "shakespeare_char_order")  # dataset directory
    vocabulary: str = os.path.join(
        "data", "shakespeare_char"
    )  # the prepared dataset whose characters the encoder reads
    n_train: int = 4500  # training rows (from the text's first 90%)
    n_val: int = 500  # validation rows (from its last 10%)
    min_words: int = 5  # shortest line taken, in words
    seed: int = 2357  # seed of the line choice and the shuffles

    def __post_init__(self):
        if self.n_train < 2 or self.n_val < 1 or self.min_words < 2:
            raise ValueError("--n_train must be >= 2, --n_val >= 1 and --min_words >= 2")


def labelled_lines(text: str, n: int, min_words: int, rng: random.Random) -> list[dict]:
    """n rows {"text", "label"} from the lines of `text`: each line as written ("real") or with its words in another
    order ("shuffled"), with even odds."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line.split()) >= min_words and not line.endswith(":")]
    if len(lines) < n:
        fail(f"the text has {len(lines)} lines of {min_words}+ words, fewer than the {n} asked for; ask for fewer")
    rows = []
    for line in rng.sample(lines, n):
        words = line.split()
        if rng.random() < 0.5 or len(set(words)) == 1:
            rows.append({"text": line, "label": "real"})
            continue
        shuffled = words
        while shuffled == words:
            shuffled = rng.sample(words, len(words))
        rows.append({"text": " ".join(shuffled), "label": "shuffled"})
    return rows


def main(argv=None):
    args = parse_config(OrderConfig, sys.argv[1:] if argv is None else argv, usage=__doc__)
    load_data(args.vocabulary, 1, splits=())  # prepared? (else one line saying how), before anything is written
    text = read_or_download(os.path.join(args.vocabulary, "input.txt"), TINY_SHAKESPEARE_URL)
    cut = int(len(text) * 0.9)  # where prepare/shakespeare_char.py's validation split begins
    rng = random.Random(args.seed)
    rows = {"train": labelled_lines(text[:cut], args.n_train, args.min_words, rng)}
    rows["val"] = labelled_lines(text[cut:], args.n_val, args.min_words, rng)
    os.makedirs(args.out, exist_ok=True)
    files = {split: os.path.join(args.out, f"{split}.jsonl") for split in rows}
    for split, path in files.items():
        write_file(path, "".join(json.dumps(row) + "\n" for row in rows[split]).encode("utf-8"))
    flags = [f"--input={files['train']}", f"--val_input={files['val']}", f"--tokenizer={args.vocabulary}"]
    return classify.main([*flags, f"--out={args.out}"])


if __name__ == "__main__":
    run_cli(main)
