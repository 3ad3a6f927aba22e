"""OpenWebText (8,013,769 documents, ~9B GPT-2 tokens) for GPT-2 pretraining: nanoGPT's recipe.

    python prepare/openwebtext.py                 # writes data/openwebtext/ (~17 GB train.bin; needs ~54 GB of disk
                                                  # for the download cache, and the network)
    python prepare/openwebtext.py --num_proc=16   # more tokenizing processes

Validation: 0.05% of the documents (about 4,000), chosen with nanoGPT's seed 2357. Extra options go to
prepare/text.py (see `python prepare/text.py --help`).
"""

import sys

import text

from engine.errors import run_cli  # text put the repository root on sys.path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    defaults = ["--input=Skylion007/openwebtext", "--out=data/openwebtext", "--val_fraction=0.0005", "--seed=2357"]
    return text.main(defaults + list(argv))  # later options override the defaults


if __name__ == "__main__":
    run_cli(main)
