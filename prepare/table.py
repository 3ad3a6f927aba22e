"""Rows of a table for the prepare scripts: a local .jsonl, .json, .parquet or .csv file, or a Hugging Face hub
dataset, read column by column. A line that is not JSON, a missing column, a row that is not UTF-8: one line naming
it (token_writer.fail), never a traceback."""

import json
import os

import numpy as np
from token_writer import check_source_file, fail

BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}  # read with `datasets` (.jsonl is read here)


def read_columns(path: str, columns: list[str], config=None, split="train", cache_dir=None) -> tuple[dict, str]:
    """({column: its values, in row order}, a description of the source). A local .jsonl is read line by line, so an
    error names the line; other files and hub datasets through `datasets`."""
    local = os.path.isfile(path)
    if local and path.lower().endswith((".jsonl", ".json", ".csv")):
        check_source_file(path)  # before a parser sees it: one line for bytes that would crash one
    if local and path.endswith(".jsonl"):
        values = {c: [] for c in columns}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        fail(f"{path}:{n}: not valid JSON ({e}); fix or remove that line")
                    for c in columns:
                        values[c].append(row.get(c) if isinstance(row, dict) else row)
        return values, f"local file {path}"
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if local:
            builder = BUILDERS.get(os.path.splitext(path)[1].lower())
            if builder is None:
                fail(f"{path}: give a .jsonl, {', '.join(BUILDERS)} file")
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
            source = f"local file {path}"
        else:
            ds = datasets.load_dataset(path, config, split=split, cache_dir=cache_dir)
            source = f"hub dataset {path}" + (f" ({config})" if config else "") + f", {split}"
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
        fail(f"could not read {path}: {str(e).splitlines()[0][:300]}")
    except datasets.exceptions.DatasetGenerationError as e:
        fail(f"could not read {path}: {str(e.__cause__ or e).splitlines()[0][:300]}")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        fail(f"no column {missing[0]!r} in {path} (columns: {', '.join(ds.column_names)})")
    try:
        return {c: list(ds[c]) for c in columns}, source  # (lazy columns: their strings are decoded here)
    except UnicodeDecodeError:  # a Parquet file or a hub dataset may hold any bytes: name the first such row
        bad = next(n for n in range(len(ds)) if not _decodes(ds, n))
        fail(f"row {bad + 1} of {path} is not UTF-8 text; convert it, e.g. iconv -t UTF-8")


def _decodes(ds, n: int) -> bool:
    """Whether row n of the dataset holds only UTF-8 strings."""
    try:
        ds[n]
    except UnicodeDecodeError:
        return False
    return True


def split_rows(n: int, n_val_input: int | None, val_fraction: float, seed: int, path: str, what: str) -> dict:
    """{"train": row numbers, "val": row numbers}: the n input rows, then the n_val_input rows read from --val_input;
    without those a random val_fraction of the input (at least one row; `what` names the rows in the error)."""
    if n_val_input is not None:
        return {"train": list(range(n)), "val": list(range(n, n + n_val_input))}
    if n < 2:
        fail(f"{path} holds {n} {what}; a train and a val split need at least 2")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}
