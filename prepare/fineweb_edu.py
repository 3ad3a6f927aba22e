"""FineWeb-Edu's 10B-token sample (HuggingFaceFW/fineweb-edu, config sample-10BT) in the GPT-2 BPE.

    python prepare/fineweb_edu.py                 # writes data/fineweb_edu/ (~20 GB train.bin; needs the network)
    python prepare/fineweb_edu.py --max_documents=100000   # a slice, for trying things out

Validation: 0.1% of the documents. Extra options go to prepare/text.py (see `python prepare/text.py --help`).
"""

import sys

import text

from engine.errors import run_cli  # text put the repository root on sys.path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    defaults = [
        "--input=HuggingFaceFW/fineweb-edu",
        "--config=sample-10BT",
        "--out=data/fineweb_edu",
        "--val_fraction=0.001",
    ]
    return text.main(defaults + list(argv))


if __name__ == "__main__":
    run_cli(main)
