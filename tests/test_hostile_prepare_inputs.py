"""Hostile inputs to prepare/text.py and prepare/chat.py: bytes that are not UTF-8, lone surrogates and JSON nested
50,000 deep are each one line naming the file and its line (or row), exit code 2, and no file written.

Generated cases (hypothesis, derandomized) hide one hostile row at a random place among ordinary ones, in every
local text format each script reads; explicit cases pin the three reported ones through the real scripts, and
Parquet, whose strings are checked once loaded. A dataset already in the output directory must stay as it was.
"""

import hashlib
import json
import os
import subprocess
import sys

import chat as prepare_chat
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import text
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from token_writer import MAX_JSON_DEPTH, check_source_file

from engine.errors import run_cli

GENERATED = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NOT_UTF8 = [b"\xff", b"\x80", b"\xe9", b"\xc3(", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)
KINDS = ["bytes", "surrogate", "nesting"]
REPORTED = {"bytes": b"\xe9", "surrogate": 0xD800, "nesting": 50_000}  # the three reported ones


def text_row(words: str) -> dict:
    return {"text": f"a document: {words}"}


def chat_row(words: str) -> dict:
    return {"messages": [{"role": "user", "content": f"say {words}"}, {"role": "assistant", "content": f"{words}!"}]}


def hostile(kind: str, row: dict, bad: bytes = b"\xe9", surrogate: int = 0xD800, depth: int = 50_000) -> bytes:
    """`row` as one line of JSON with something hostile in it: bytes that are not UTF-8 or a lone surrogate's escape
    in its first string, or a field nested `depth` deep."""
    line = json.dumps(row).encode()  # ASCII: what follows an insertion never completes a character
    cut = line.index(b'": "') + 4  # inside the first string
    if kind == "bytes":
        return line[:cut] + bad + line[cut:]
    if kind == "surrogate":
        return line[:cut] + f"\\u{surrogate:04x}".encode() + line[cut:]
    return line[:-1] + b', "nested": ' + b"[" * depth + b"]" * depth + b"}"


def write_json(path, fmt: str, lines: list[bytes]) -> int:
    """Rows as a .jsonl file, or a .json array of one row per line; returns the line of row 0."""
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n" if fmt == "jsonl" else b"[\n" + b",\n".join(lines) + b"\n]\n")
    return 1 if fmt == "jsonl" else 2


def snapshot(root) -> dict[str, str]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return files


def refused(main, argv: list[str], out: str, capsys) -> str:
    """The one line main(argv) stops with, run as the script runs it: exit code 2, and nothing in `out` changed."""
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([*argv, f"--out={out}", "--tokenizer=char"]))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert snapshot(out) == before and before
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    """stderr holds the one line only: no "Generating train split" bars from `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> dict[str, str]:
    """A text and a chat dataset already in place, that no refused input may touch: their directories by script."""
    root = tmp_path_factory.mktemp("previous")
    texts, chats = root / "texts.jsonl", root / "chats.jsonl"
    texts.write_text("".join(json.dumps(text_row(f"number {i}")) + "\n" for i in range(20)))
    chats.write_text("".join(json.dumps(chat_row(f"number {i}")) + "\n" for i in range(20)))
    out = {"text": str(root / "text"), "chat": str(root / "chat")}
    text.main([f"--input={texts}", f"--out={out['text']}", "--tokenizer=char", f"--cache_dir={root / 'cache'}"])
    prepare_chat.main([f"--input={chats}", f"--out={out['chat']}", "--tokenizer=char"])
    return out


@given(
    fmt=st.sampled_from(["jsonl", "json", "txt", "csv"]),
    kind=st.sampled_from(KINDS),
    words=st.lists(WORDS, min_size=3, max_size=12),
    at=st.integers(0, 11),
    bad=st.sampled_from(NOT_UTF8),
    surrogate=st.integers(0xD800, 0xDFFF),
    depth=st.integers(MAX_JSON_DEPTH, 3000),
)
@GENERATED
def test_text_refuses_a_hostile_row_naming_its_line(
    previous, tmp_path_factory, capsys, fmt, kind, words, at, bad, surrogate, depth
):
    d = tmp_path_factory.mktemp("text")
    path, at = str(d / f"input.{fmt}"), at % len(words)
    if fmt in ("jsonl", "json"):
        lines = [json.dumps(text_row(w)).encode() for w in words]
        lines[at] = hostile(kind, text_row(words[at]), bad, surrogate, depth)
        line = write_json(path, fmt, lines) + at
    else:  # plain text: only bytes can be hostile there
        rows = [json.dumps(w).encode() if fmt == "csv" else w.encode() for w in words]
        rows[at] = bad + rows[at]  # at the start of a line: nothing before it to complete a character
        header = [b"text"] if fmt == "csv" else []
        with open(path, "wb") as f:
            f.write(b"\n".join(header + rows) + b"\n")
        line = len(header) + at + 1
    err = refused(text.main, [f"--input={path}", f"--cache_dir={d / 'cache'}"], previous["text"], capsys)
    assert err.startswith(f"error: {path}:{line}: "), err


@given(
    fmt=st.sampled_from(["jsonl", "json"]),
    kind=st.sampled_from(KINDS),
    words=st.lists(WORDS, min_size=3, max_size=12),
    at=st.integers(0, 11),
    bad=st.sampled_from(NOT_UTF8),
    surrogate=st.integers(0xD800, 0xDFFF),
    depth=st.integers(MAX_JSON_DEPTH, 3000),
)
@GENERATED
def test_chat_refuses_a_hostile_row_naming_its_line(
    previous, tmp_path_factory, capsys, fmt, kind, words, at, bad, surrogate, depth
):
    d = tmp_path_factory.mktemp("chat")
    path, at = str(d / f"input.{fmt}"), at % len(words)
    lines = [json.dumps(chat_row(w)).encode() for w in words]
    lines[at] = hostile(kind, chat_row(words[at]), bad, surrogate, depth)
    line = write_json(path, fmt, lines) + at
    err = refused(prepare_chat.main, [f"--input={path}", f"--cache_dir={d / 'cache'}"], previous["chat"], capsys)
    assert err.startswith(f"error: {path}:{line}: "), err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script", ["text", "chat"])
def test_the_reported_inputs_are_one_line_and_exit_code_2(previous, tmp_path, script, kind):
    """Through the real script: the 50,000-deep file crashed pyarrow's JSON reader (exit code 139) before."""
    row = text_row if script == "text" else chat_row
    lines = [json.dumps(row(f"number {i}")).encode() for i in range(6)]
    lines[3] = hostile(kind, row("three"), REPORTED["bytes"], REPORTED["surrogate"], REPORTED["nesting"])
    path = str(tmp_path / "input.jsonl")
    write_json(path, "jsonl", lines)
    before = snapshot(previous[script])
    argv = [f"--input={path}", f"--out={previous[script]}", "--tokenizer=char", f"--cache_dir={tmp_path / 'c'}"]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "prepare", f"{script}.py"), *argv], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {path}:4: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert snapshot(previous[script]) == before


def parquet_with(path, values: list[bytes], column: str = "text") -> None:
    """A Parquet file whose string column holds these bytes as they are (pyarrow checks UTF-8 only on request)."""
    raw = pa.array(values, type=pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(values), raw.buffers())
    pq.write_table(pa.table({column: strings}), path)


@pytest.mark.parametrize("bad", [b"caf\xe9", b"\xed\xa0\x80"], ids=["latin-1", "surrogate"])
def test_text_names_the_row_of_a_parquet_string_that_is_not_utf8(previous, tmp_path, capsys, bad):
    path = str(tmp_path / "input.parquet")
    parquet_with(path, [f"document {i}".encode() for i in range(5)] + [bad] + [b"the end"])
    err = refused(text.main, [f"--input={path}", f"--cache_dir={tmp_path / 'c'}"], previous["text"], capsys)
    assert path in err and "row 6 " in err and "not UTF-8" in err, err


def test_chat_names_the_row_of_a_parquet_message_that_is_not_utf8(previous, tmp_path, capsys):
    rows = pa.Table.from_pylist([chat_row(f"number {i}") for i in range(5)]).column("messages").combine_chunks()
    messages = rows.values
    contents = [c.encode() for c in messages.field("content").to_pylist()]
    contents[7] = b"caf\xe9"  # row 4's assistant message
    raw = pa.array(contents, type=pa.binary())
    content = pa.Array.from_buffers(pa.string(), len(contents), raw.buffers())
    messages = pa.StructArray.from_arrays([messages.field("role"), content], names=["role", "content"])
    path = str(tmp_path / "input.parquet")
    pq.write_table(pa.table({"messages": pa.ListArray.from_arrays(rows.offsets, messages)}), path)
    err = refused(prepare_chat.main, [f"--input={path}", f"--cache_dir={tmp_path / 'c'}"], previous["chat"], capsys)
    assert err == f"error: row 4 of {path} is not UTF-8 text; convert it, e.g. iconv -t UTF-8"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),  # any text: quotes, backslashes, brackets, emoji
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


def nested(value, depth: int):
    return value if depth == 0 else [nested(value, depth - 1)]


@given(rows=st.lists(JSON_VALUES, min_size=1, max_size=8), ascii=st.booleans(), at=st.integers(0, 7))
@GENERATED
def test_what_only_looks_hostile_is_accepted(tmp_path_factory, rows, ascii, at):
    """Escaped pairs (an emoji with ensure_ascii), an escaped backslash before "ud800", brackets inside strings and
    nesting MAX_JSON_DEPTH deep are ordinary JSON; one level more is refused at its line."""
    rows = [{"text": "\\ud800 [[[[ {{ \U0001f600", "value": v} for v in rows]
    at %= len(rows)
    rows[at]["deep"] = nested(1, MAX_JSON_DEPTH - 1)  # inside the row's object: MAX_JSON_DEPTH levels
    path = tmp_path_factory.mktemp("ok") / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ascii) + "\n" for r in rows), encoding="utf-8")
    check_source_file(str(path))
    rows[at]["deep"] = nested(1, MAX_JSON_DEPTH)
    path.write_text("".join(json.dumps(r, ensure_ascii=ascii) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(SystemExit):
        check_source_file(str(path))


def test_escaped_pairs_and_brackets_in_strings_make_a_dataset(tmp_path):
    """End to end: what only looks hostile goes through prepare/text.py and prepare/chat.py."""
    words = ["\U0001f600 smiles", "a backslash and \\ud800", "[[[[ {{{{ ]] }", 'a "quote"']
    texts, chats = tmp_path / "texts.jsonl", tmp_path / "chats.jsonl"
    texts.write_text("".join(json.dumps(text_row(w)) + "\n" for w in words * 3))
    chats.write_text("".join(json.dumps(chat_row(w)) + "\n" for w in words * 3))
    meta = text.main([f"--input={texts}", f"--out={tmp_path / 't'}", "--tokenizer=char", f"--cache_dir={tmp_path}"])
    assert "\U0001f600" in meta["chars"] and "\\" in meta["chars"]
    meta = prepare_chat.main([f"--input={chats}", f"--out={tmp_path / 'c'}", "--tokenizer=char"])
    assert "\U0001f600" in meta["chars"]
