"""prepare/text.py: local sources through datasets offline, exact token counts, dtype choice, manifests, and
interrupted prepares that never look finished."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import text
import tiktoken
from conftest import ROOT, needs_gpt2_tokenizer, shakespeare_text

from engine.data import Tokenizer, load_data
from engine.errors import UserError, run_cli


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def documents(n=300):
    paragraphs = [p for p in shakespeare_text(60_000).split("\n\n") if p]
    return paragraphs[:n]


def kv(*args) -> list[str]:
    """--key value pairs as the --key=value every script takes."""
    return [f"{k}={v}" for k, v in zip(args[::2], args[1::2], strict=True)]


def run(tmp_path, *args):
    out = tmp_path / "out"
    meta = text.main(kv(*args, "--out", out, "--cache_dir", tmp_path / "cache", "--num_proc", 1))
    return out, meta


def expected_tokens(docs):
    enc = tiktoken.get_encoding("gpt2")
    return sum(len(enc.encode_ordinary(d)) + 1 for d in docs)


def read_ids(out, split, meta):
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


@needs_gpt2_tokenizer
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "txt"])
def test_local_formats_count_every_token_plus_one_eot(tmp_path, fmt):
    docs = documents()
    if fmt == "txt":  # one document per file
        docs = docs[:20]
        for i, d in enumerate(docs):
            (tmp_path / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
        source = str(tmp_path / "doc*.txt")
    else:
        import datasets

        path = tmp_path / f"docs.{fmt}"
        ds = datasets.Dataset.from_dict({"body": docs, "id": list(range(len(docs)))})
        {"jsonl": ds.to_json, "parquet": ds.to_parquet, "csv": ds.to_csv}[fmt](str(path))
        source = str(path)
    extra = [] if fmt == "txt" else ["--text_column", "body"]
    out, meta = run(tmp_path, "--input", source, *extra, "--val_fraction", "0.1")
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs)
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == expected_tokens(docs)
    eot = meta["eot_id"]
    for split in ("train", "val"):
        ids = read_ids(out, split, meta)
        assert len(ids) == splits[split]["tokens"]
        assert (ids == eot).sum() == splits[split]["documents"] and ids[-1] == eot
    # the training side reads it back and decodes the documents exactly
    data = load_data(str(out), block_size=8)
    tok = Tokenizer(data.meta)
    decoded = tok.decode(read_ids(out, "train", meta).tolist()).split("<|endoftext|>")[:-1]
    assert len(decoded) == splits["train"]["documents"] and set(decoded) <= set(docs)
    assert meta["tokenizer_hash"] and meta["dtype"] == "uint16"


@needs_gpt2_tokenizer
def test_single_document_is_split_by_tokens(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(shakespeare_text(20_000), encoding="utf-8")
    out, meta = run(tmp_path, "--input", path, "--val_fraction", "0.1")
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert total == expected_tokens([shakespeare_text(20_000)])
    assert meta["splits"]["val"]["tokens"] == total - int(total * 0.9)


def test_char_tokenizer_matches_shakespeare_char_script(tmp_path):
    import shakespeare_char

    path = tmp_path / "input.txt"
    path.write_text(shakespeare_text(50_000), encoding="utf-8")
    _, meta = run(tmp_path, "--input", path, "--tokenizer", "char")
    shakespeare_char.main(kv("--input", path, "--out", tmp_path / "ref"))
    ref = json.loads((tmp_path / "ref" / "meta.json").read_text())
    for key in ("chars", "vocab_size", "tokenizer_hash", "dtype"):
        assert meta[key] == ref[key]
    assert {s: v["sha256"] for s, v in meta["splits"].items()} == {s: v["sha256"] for s, v in ref["splits"].items()}


def test_uint32_above_65536_symbols(tmp_path):
    # 70,000 distinct characters (skipping the surrogate range) make a character vocabulary that needs uint32.
    codes = [c for c in range(0x100, 0x100 + 72_100) if not 0xD800 <= c <= 0xDFFF][:70_000]
    body = "".join(map(chr, codes))
    path = tmp_path / "wide.txt"
    path.write_text(body + body[:1000], encoding="utf-8")
    out, meta = run(tmp_path, "--input", path, "--tokenizer", "char", "--val_fraction", "0.01")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    ids = read_ids(out, "train", meta)
    assert ids.max() == 69_999 and os.path.getsize(out / "train.bin") == 4 * meta["splits"]["train"]["tokens"]
    assert load_data(str(out), block_size=8).dtype == np.uint32


def test_tokenizer_dir_equals_tiktoken_cache(tmp_path):
    """GPT-2's original vocab.bpe + encoder.json give the same encoding as tiktoken's (its cache holds those files)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not os.path.isdir(cache):
        pytest.skip("needs TIKTOKEN_CACHE_DIR with tiktoken's GPT-2 cache files")
    vocab_dir = tmp_path / "gpt2_files"
    vocab_dir.mkdir()
    for name in os.listdir(cache):
        head = open(os.path.join(cache, name), "rb").read(1)
        (vocab_dir / ("encoder.json" if head == b"{" else "vocab.bpe")).write_bytes(
            open(os.path.join(cache, name), "rb").read()
        )
    docs = documents(50)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _, meta_dir = run(tmp_path, "--input", path, "--tokenizer_dir", vocab_dir, "--val_fraction", "0")
    ref = text.main(
        kv("--input", path, "--out", tmp_path / "o2", "--val_fraction", 0, "--cache_dir", tmp_path / "cache")
    )
    assert meta_dir["tokenizer_hash"] == ref["tokenizer_hash"]
    assert meta_dir["splits"]["train"]["sha256"] == ref["splits"]["train"]["sha256"]


@needs_gpt2_tokenizer
def test_wrong_tokenizer_vocabulary_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(20)))
    out, meta = run(tmp_path, "--input", path)
    meta["tokenizer_hash"] = "0" * 64
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="hash"):
        Tokenizer(load_data(str(out), block_size=8).meta)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/nonexistent/*.txt"], "no input files"),
        (["--input", "{tmp}/docs.jsonl", "--text_column", "body"], "no column 'body'"),
        (["--input", "{tmp}/docs.jsonl", "--val_fraction", "1.5"], "val_fraction"),
        (["--input", "{tmp}/docs.xml"], "must all be one of"),
        (["--input", "{tmp}/docs.jsonl", "--tokenizer", "nope_encoding"], "unknown tiktoken encoding"),
        (["--input", "some-user/some-dataset-that-is-not-here"], "could not read"),
    ],
)
def test_bad_inputs_fail_in_one_line(tmp_path, args, message, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "docs.xml").write_text("<a/>")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: text.main(kv(*args, "--out", tmp_path / "out", "--cache_dir", tmp_path / "cache")))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_prepare_killed_half_way_leaves_the_previous_dataset_and_the_next_one_clears_up(tmp_path):
    """kill -9 while the new token files are being written: the dataset already in --out is untouched (it still
    loads, byte for byte the same), and the next prepare removes what the killed one staged."""
    out = tmp_path / "out"
    small = tmp_path / "small.txt"
    small.write_text(shakespeare_text(20_000), encoding="utf-8")
    run(tmp_path, "--input", small, "--tokenizer", "char")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    big = tmp_path / "big.txt"
    big.write_text(shakespeare_text() * 60, encoding="utf-8")  # ~12 MB, one document
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "prepare/text.py", *kv("--input", big, "--tokenizer", "char", "--out", out)]
    cmd += kv("--cache_dir", tmp_path / "cache")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = out / f"train.bin.tmp-{proc.pid}"
    deadline = time.time() + 120
    while time.time() < deadline and not staged.exists() and proc.poll() is None:
        time.sleep(0.005)  # polls for the event (the staged file appearing), with no fixed wait
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not staged.exists():
        pytest.skip("prepare finished before it could be interrupted")
    assert {f.name: f.read_bytes() for f in out.iterdir() if f != staged} == before
    load_data(str(out), block_size=8)
    run(tmp_path, "--input", small, "--tokenizer", "char")  # the next writer clears what the dead one staged
    assert sorted(f.name for f in out.iterdir()) == sorted(before)


def test_char_vocabulary_covers_the_val_split_and_ignores_the_seed(tmp_path):
    """Documents split by --val_fraction: a character only a val document holds used to crash the encoder, and the
    vocabulary changed with --seed."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"words and one character of its own: {chr(0x100 + i)}"} for i in range(40)]  # each one unique
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    metas = [
        run(tmp_path, "--input", path, "--tokenizer", "char", "--val_fraction", "0.1", "--seed", seed)[1]
        for seed in (0, 1)
    ]
    assert all({chr(0x100 + i) for i in range(40)} <= set(m["chars"]) for m in metas)
    assert metas[0]["tokenizer_hash"] == metas[1]["tokenizer_hash"]


def test_the_script_exits_0_and_prints_no_manifest(tmp_path):
    # main() returns the manifest to in-process callers; run as a script that must not become the exit status
    # (SystemExit(dict) printed the dict and exited 1)
    (tmp_path / "notes.txt").write_text("hello there, general kenobi\n" * 50)
    done = subprocess.run(
        [sys.executable, "prepare/text.py", f"--input={tmp_path / 'notes.txt'}", "--tokenizer=char"]
        + [f"--out={tmp_path / 'out'}", "--num_proc=1", f"--cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "'format'" not in done.stderr and "{" not in done.stdout
