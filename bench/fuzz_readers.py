"""Fuzz every reader of an untrusted file for longer than the suite does, and print what it found.

    python bench/fuzz_readers.py                                   # 2,000 examples per reader
    python bench/fuzz_readers.py --examples=5000 --seed=7          # more, from another seed
    python bench/fuzz_readers.py --only="tokenizer.json (BPE)"     # one reader (names as printed)
    python bench/fuzz_readers.py --save_to=fuzz-failures           # each first failing input, whole, to a file

The hostile files and the rules they are held to are tests/hostile_files.py's, the same that
tests/test_untrusted_files.py runs a few hundred of per reader in the suite: a reader either accepts a file that then
works, or refuses it in one line naming it and changes nothing. Prints, per reader, the examples tried, the failures
found, and the first failing input with what went wrong; exits 1 when anything failed.
"""

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from engine.configurator import parse_config
from engine.errors import run_cli


@dataclass
class FuzzConfig:
    examples: int = 2000  # hostile files per reader
    seed: int = 0  # hypothesis' seed: the same seed tries the same files
    only: str = ""  # one reader's name, as printed (default: every reader)
    save_to: str | None = None  # a directory to write each reader's first failing input to, whole


def fuzz(reader, worlds: dict, examples: int, seed: int) -> tuple[dict, list[tuple[bytes, str]]]:
    """({"tried", "accepted", "refused", ...}: counts, [(input, what went wrong)] for every failure) of `examples`
    hostile files for `reader`."""
    from hostile_files import attempt, load_base, variants
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    counts, failures = {"tried": 0}, []
    base = load_base(reader, worlds)

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        content = data.draw(variants(reader, base))
        counts["tried"] += 1
        problem = attempt(reader, worlds, content, counts)
        if problem:
            failures.append((content, problem))

    run()
    return counts, failures


def main(argv=None):
    cfg = parse_config(FuzzConfig, argv, usage=__doc__)
    from hostile_files import READERS, build_world, summary

    readers = [r for r in READERS if not cfg.only or r.name == cfg.only]
    if not readers:
        print(f"no reader named {cfg.only!r}; the readers: {', '.join(r.name for r in READERS)}")
        return 2
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-world-") as root:
        worlds = build_world(root)
        print(f"{'reader':<24} {'examples':>9} {'accepted':>9} {'refused':>9} {'failures':>9} {'seconds':>8}")
        for reader in readers:
            start = time.perf_counter()
            counts, failures = fuzz(reader, worlds, cfg.examples, cfg.seed)
            row = [counts["tried"], counts.get("accepted", 0), counts.get("refused", 0), len(failures)]
            seconds = time.perf_counter() - start
            print(f"{reader.name:<24} " + " ".join(f"{n:>9,}" for n in row) + f" {seconds:>8.1f}", flush=True)
            if failures:
                content, problem = failures[0]
                print(f"  first failure: {problem}\n  its input: {summary(content)}", flush=True)
                if cfg.save_to:
                    os.makedirs(cfg.save_to, exist_ok=True)
                    path = os.path.join(cfg.save_to, re.sub(r"\W+", "-", reader.name).strip("-") + ".bin")
                    with open(path, "wb") as f:
                        f.write(content)
                    print(f"  saved to {path}")
            failed += bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
