"""The token-file contract: prepare scripts against nanoGPT's published counts and tiktoken, batches against the
files they are cut from, load_data's errors and checksums, and a run that keeps reading the files it checked while the
dataset is prepared again."""

import errno
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import shakespeare
import shakespeare_char
import token_writer
import torch
from conftest import needs_gpt2_tokenizer
from test_chat import conversations
from test_chat import prepare as prepare_chat

from engine.data import TokenData, Tokenizer, chat_rows, get_batch, load_data, target_count, train_key
from engine.errors import UserError


@pytest.fixture
def char_dir(char_data) -> str:
    return os.path.join(char_data, "tiny_char")


def read_meta(directory) -> dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_tokens(directory, train, val, vocab_size: int = 65) -> str:
    """A dataset holding exactly the given token ids, through the prepare scripts' writer."""
    tokenizer = {"tokenizer": "char", "vocab_size": vocab_size, "eot_id": None, "chars": "".join(map(chr, range(65)))}
    token_writer.write_dataset(str(directory), {"train": np.asarray(train), "val": np.asarray(val)}, tokenizer, "test")
    return str(directory)


# --- batches ---------------------------------------------------------------------------------------------------------


def test_batch_contract(char_dir):
    data = load_data(char_dir, block_size=16)
    x, y = get_batch(data, "train", 8, 16, key=(1337, 0, 0), device="cpu")
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted left by one token
    vocab = data.meta["vocab_size"]
    assert vocab == len(data.meta["chars"])
    assert int(x.min()) >= 0 and int(torch.maximum(x, y).max()) < vocab


def test_batch_windows_are_slices_of_the_file_and_of_the_text(char_dir):
    data = load_data(char_dir, block_size=16)
    tokens = np.fromfile(os.path.join(char_dir, "train.bin"), dtype=np.uint16)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 17)  # every (T+1)-token slice of the file
    with open(os.path.join(char_dir, "input.txt"), encoding="utf-8") as f:
        text = f.read()
    x, y = get_batch(data, "train", 6, 16, key=(7, 3, 1), device="cpu")
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        window = np.append(row_x, row_y[-1])
        assert (windows == window).all(axis=1).any(), "the window is not a slice of train.bin"
        assert "".join(data.meta["chars"][i] for i in window) in text  # and it decodes to a piece of the text


def test_same_key_same_batch_other_key_other_batch(char_dir):
    data = load_data(char_dir, block_size=16)
    a = get_batch(data, "train", 4, 16, key=(1, 2, 3), device="cpu")
    b = get_batch(data, "train", 4, 16, key=(1, 2, 3), device="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in [(1, 2, 4), (1, 3, 3), (2, 2, 3)]:
        assert not torch.equal(get_batch(data, "train", 4, 16, key=other, device="cpu")[0], a[0]), other
    assert not torch.equal(get_batch(data, "val", 4, 16, key=(1, 2, 3), device="cpu")[0], a[0])


def test_every_start_offset_is_reachable(tmp_path):
    # A split of N tokens holds N - T windows of T + 1 tokens (nanoGPT: torch.randint(len(data) - block_size)).
    # The last window, the only one that ends with the split's last token, must be drawn as well as the others.
    T = 4
    directory = write_tokens(tmp_path / "d", train=np.arange(T + 3), val=np.arange(T + 3))
    data = load_data(directory, block_size=T)
    starts, last_targets = set(), set()
    for i in range(50):
        x, y = get_batch(data, "train", 8, T, key=(0, i), device="cpu")
        starts |= set(x[:, 0].tolist())  # token i sits at offset i
        last_targets |= set(y[:, -1].tolist())
    assert starts == {0, 1, 2}
    assert T + 2 in last_targets  # the split's last token is a target


def test_uint32_tokens_read_back_intact(tmp_path):
    vocab = 70_000
    ids = np.array([0, 69_999, 65_536, 65_535, 123, 66_000, 7, 8, 9, 10], dtype=np.int64)
    tokenizer = {"tokenizer": "test", "vocab_size": vocab, "eot_id": None}
    meta = token_writer.write_dataset(str(tmp_path), {"train": ids, "val": ids}, tokenizer, "test")
    assert meta["dtype"] == "uint32"
    data = TokenData(str(tmp_path), meta)
    x, y = get_batch(data, "train", 16, 4, key=(0,), device="cpu")
    windows = np.lib.stride_tricks.sliding_window_view(ids, 5)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (windows == row).all(axis=1).any()


# --- load_data errors ------------------------------------------------------------------------------------------------


def test_missing_directory_says_to_run_prepare(tmp_path):
    with pytest.raises(UserError, match="prepare"):
        load_data(str(tmp_path / "shakespeare_char"), block_size=8)


def test_truncated_token_file_is_refused(char_dir, tmp_path):
    copy = shutil.copytree(char_dir, tmp_path / "copy")
    path = copy / "train.bin"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)  # one uint16 token short
    with pytest.raises(UserError, match="train.bin"):
        load_data(str(copy), block_size=8)


def test_missing_token_file_is_refused(char_dir, tmp_path):
    copy = shutil.copytree(char_dir, tmp_path / "copy")
    os.remove(copy / "val.bin")
    with pytest.raises(UserError, match="val.bin"):
        load_data(str(copy), block_size=8)


def test_split_shorter_than_block_size_is_refused(tmp_path):
    directory = write_tokens(tmp_path / "d", train=np.arange(60), val=np.arange(10))
    load_data(directory, block_size=8)
    with pytest.raises(UserError, match="block_size"):
        load_data(directory, block_size=10)  # val holds 10 tokens: not one window of 11


def test_foreign_meta_json_is_refused(char_dir, tmp_path):
    copy = shutil.copytree(char_dir, tmp_path / "copy")
    meta = read_meta(copy) | {"format": "something-else"}
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format"):
        load_data(str(copy), block_size=8)


class _Tripwire:
    """Unpickling this creates a file: proof that a meta.pkl was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_nanogpt_meta_pkl_is_never_unpickled(tmp_path):
    directory = tmp_path / "shakespeare_char"
    directory.mkdir()
    tripwire = tmp_path / "unpickled"
    (directory / "meta.pkl").write_bytes(pickle.dumps(_Tripwire(str(tripwire))))
    np.arange(100, dtype=np.uint16).tofile(directory / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(directory / "val.bin")
    with pytest.raises(UserError, match="meta.pkl") as e:
        load_data(str(directory), block_size=8)
    assert "prepare" in str(e.value)
    assert not tripwire.exists()


# --- checksums: every hash meta.json records is checked at load -----------------------------------------------------


def corrupt_mask_all_ones(path):  # the same length and valid values: the run would train on the user's turns too
    np.ones(os.path.getsize(path), dtype=np.uint8).tofile(path)


def corrupt_starts(path):  # still rising from 0 to the end: only the hash tells
    starts = np.fromfile(path, dtype=np.int64)
    starts[1] += 1
    starts.tofile(path)


@pytest.mark.parametrize(
    "name, corrupt, match",
    [
        ("train.mask.bin", corrupt_mask_all_ones, "train.mask.bin does not match the sha256"),
        ("val.mask.bin", corrupt_mask_all_ones, "val.mask.bin does not match the sha256"),
        ("train.starts.bin", corrupt_starts, "train.starts.bin does not match the sha256"),
    ],
)
def test_a_corrupted_chat_file_is_refused_by_its_recorded_hash(tmp_path, name, corrupt, match):
    directory = os.path.join(prepare_chat(tmp_path, None, "--val_fraction=0.2"), "chat")
    load_data(directory, block_size=64).close()
    corrupt(os.path.join(directory, name))
    with pytest.raises(UserError, match=match) as e:
        load_data(directory, block_size=64)
    assert "re-run prepare/chat.py" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "value, match", [(2, "train.mask.bin holds 2 at position 5, not 0 or 1"), (None, "train.mask.bin trains on")]
)
def test_a_chat_mask_too_large_to_hash_is_checked_by_its_values_and_count(tmp_path, value, match):
    directory = os.path.join(prepare_chat(tmp_path), "chat")
    meta = read_meta(directory)
    del meta["splits"]["train"]["mask_sha256"]  # as for a mask past HASH_CHECK_BYTES
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    path = os.path.join(directory, "train.mask.bin")
    mask = np.fromfile(path, dtype=np.uint8)
    if value is None:
        mask[np.argmax(mask == 0)] = 1  # one user token more to train on: valid values, the wrong count
    else:
        mask[5] = value
    mask.tofile(path)
    with pytest.raises(UserError, match=match):
        load_data(directory, block_size=64)


def test_a_char_vocabulary_that_differs_from_its_hash_is_refused(char_dir, tmp_path):
    copy = shutil.copytree(char_dir, tmp_path / "copy")
    meta = read_meta(copy)
    meta["chars"] = meta["chars"][1] + meta["chars"][0] + meta["chars"][2:]  # two ids swapped: every decode is wrong
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json.*vocabulary hash"):
        load_data(str(copy), block_size=8)


# --- a dataset prepared again while a run reads it -----------------------------------------------------------------


def test_a_run_keeps_reading_the_token_files_it_checked_when_the_dataset_is_prepared_again(tmp_path):
    old, new = np.arange(40) % 65, (np.arange(40) + 7) % 65
    directory = write_tokens(tmp_path / "d", train=old, val=old)
    with load_data(directory, block_size=8) as data:
        before = get_batch(data, "train", 4, 8, key=(0,), device="cpu")
        write_tokens(tmp_path / "d", train=new, val=new)  # a staged file os.replace'd into place, as prepare does
        after = get_batch(data, "train", 4, 8, key=(0,), device="cpu")
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert set(after[0][:, 0].tolist()) <= set(range(32))  # windows of the old ids (offset i holds token i)
    with load_data(directory, block_size=8) as fresh:  # a new run reads the new dataset
        assert not torch.equal(get_batch(fresh, "train", 4, 8, key=(0,), device="cpu")[0], before[0])


def test_a_chat_run_keeps_reading_the_files_it_checked_when_the_dataset_is_prepared_again(tmp_path):
    directory = os.path.join(prepare_chat(tmp_path), "chat")
    data = load_data(directory, block_size=48)
    key = train_key(1, 0, 0)
    rows, count = chat_rows(data, "train", 6, 48, key), target_count(data, "train", 6, 48, key)
    prepare_chat(tmp_path, conversations()[::-1][:12])  # tokens, mask and starts all replaced
    again = chat_rows(data, "train", 6, 48, key)
    assert np.array_equal(rows[0], again[0]) and np.array_equal(rows[1], again[1])
    assert target_count(data, "train", 6, 48, key) == count
    data.close()


def test_a_copy_of_the_data_reopens_the_files_only_while_they_are_the_ones_checked(char_dir, tmp_path):
    copy = shutil.copytree(char_dir, tmp_path / "copy")
    with load_data(str(copy), block_size=16) as data:
        batch = get_batch(data, "train", 4, 16, key=(3,), device="cpu")
        clone = pickle.loads(pickle.dumps(data))  # another process's copy opens the files again
        assert torch.equal(get_batch(clone, "train", 4, 16, key=(3,), device="cpu")[0], batch[0])
        clone.close()
        shutil.copy(copy / "train.bin", copy / "train.bin.new")
        os.replace(copy / "train.bin.new", copy / "train.bin")  # the same bytes, but not the file that was checked
        with pytest.raises(UserError, match="train.bin was replaced"):
            get_batch(clone, "train", 4, 16, key=(3,), device="cpu")
        assert torch.equal(get_batch(data, "train", 4, 16, key=(3,), device="cpu")[0], batch[0])


# --- prepare scripts -------------------------------------------------------------------------------------------------


def test_prepare_shakespeare_char_matches_nanogpt(tmp_path, tiny_shakespeare):
    out = tmp_path / "shakespeare_char"
    shakespeare_char.main([f"--input={tiny_shakespeare}", f"--out={out}"])
    meta = read_meta(out)
    # nanoGPT's data/shakespeare_char/prepare.py prints: 1,115,394 characters, vocab size 65,
    # train has 1,003,854 tokens, val has 111,540 tokens.
    assert meta["vocab_size"] == 65 and len(meta["chars"]) == 65
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] == 1_003_854
    assert meta["splits"]["val"]["tokens"] == 111_540
    with open(tiny_shakespeare, encoding="utf-8") as f:
        text = f.read()
    ids = []
    for split in ("train", "val"):
        path = out / meta["splits"][split]["file"]
        assert os.path.getsize(path) == 2 * meta["splits"][split]["tokens"]
        assert meta["splits"][split]["sha256"] == sha256_of(path)
        ids.append(np.fromfile(path, dtype=np.uint16))
    assert "".join(np.array(list(meta["chars"]))[np.concatenate(ids)]) == text  # decodes back to the input
    load_data(str(out), block_size=256)


def test_prepare_shakespeare_gpt2_matches_tiktoken_and_nanogpt(tmp_path, tiny_shakespeare):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.get_encoding("gpt2")  # from TIKTOKEN_CACHE_DIR, set by conftest
    out = tmp_path / "shakespeare"
    shakespeare.main([f"--input={tiny_shakespeare}", f"--out={out}"])
    meta = read_meta(out)
    with open(tiny_shakespeare, encoding="utf-8") as f:
        text = f.read()
    split_at = int(len(text) * 0.9)
    expected = {"train": enc.encode_ordinary(text[:split_at]), "val": enc.encode_ordinary(text[split_at:])}
    assert len(expected["train"]) == 301_966 and len(expected["val"]) == 36_059  # nanoGPT's README figures
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256 and meta["dtype"] == "uint16"
    for split, ids in expected.items():
        path = out / meta["splits"][split]["file"]
        assert meta["splits"][split]["tokens"] == len(ids)
        assert meta["splits"][split]["sha256"] == sha256_of(path)
        assert np.array_equal(np.fromfile(path, dtype=np.uint16), np.array(ids))


def test_write_dataset_picks_the_smallest_dtype_that_fits(tmp_path):
    assert token_writer.token_dtype(65) == np.uint16
    assert token_writer.token_dtype(65_536) == np.uint16  # ids 0..65535
    assert token_writer.token_dtype(65_537) == np.uint32
    for vocab, dtype, top in [(65_536, np.uint16, 65_535), (100_277, np.uint32, 100_276)]:
        out = tmp_path / str(vocab)
        ids = np.array([0, 1, top, 2], dtype=np.int64)
        tokenizer = {"tokenizer": "test", "vocab_size": vocab, "eot_id": None}
        meta = token_writer.write_dataset(str(out), {"train": ids, "val": ids}, tokenizer, "test")
        assert meta["dtype"] == np.dtype(dtype).name == read_meta(out)["dtype"]
        assert np.array_equal(np.fromfile(out / "train.bin", dtype=dtype), ids)


def test_write_dataset_refuses_ids_outside_the_vocabulary(tmp_path):
    tokenizer = {"tokenizer": "test", "vocab_size": 10, "eot_id": None}
    with pytest.raises(ValueError, match="outside"):
        token_writer.write_dataset(str(tmp_path), {"train": np.array([1, 10]), "val": np.array([1])}, tokenizer, "t")
    assert not (tmp_path / "meta.json").exists()  # nothing looks finished


def test_a_full_disk_while_preparing_is_one_line_and_keeps_the_previous_dataset(tmp_path, monkeypatch, capsys):
    tokenizer = {"tokenizer": "test", "vocab_size": 10, "eot_id": None}
    token_writer.write_dataset(str(tmp_path), {"train": np.array([1, 2]), "val": np.array([3])}, tokenizer, "old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_writer.os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        token_writer.write_dataset(str(tmp_path), {"train": np.array([4, 5]), "val": np.array([6])}, tokenizer, "new")
    assert e.value.code == 2 and "disk full writing" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- tokenizer -------------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip(char_dir):
    tok = Tokenizer(read_meta(char_dir))
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert ids == [read_meta(char_dir)["chars"].index(c) for c in text]
    assert tok.decode(ids) == text


def test_char_tokenizer_rejects_unknown_characters(char_dir):
    tok = Tokenizer(read_meta(char_dir))
    with pytest.raises(UserError, match="#"):
        tok.encode("ROMEO # JULIET")


@needs_gpt2_tokenizer
def test_gpt2_tokenizer_round_trip():
    pytest.importorskip("tiktoken")
    tok = Tokenizer({"tokenizer": "gpt2", "eot_id": 50256})
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids, as in OpenAI's encoder.json
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]  # written in text, it is text
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok.encode(text)) == text


def test_two_ranks_read_what_one_process_reads_and_never_the_same_window(char_dir):
    """Rank r of 2 with 1 micro-step takes global micro-step r: together they read the two batches a single process
    with 2 micro-steps reads, each window once; and a resumed run asks for the very same keys."""
    from engine.data import train_key

    data = load_data(char_dir, block_size=16)

    def windows(key):
        x, _ = get_batch(data, "train", 8, 16, key, "cpu")
        return {tuple(row) for row in x.tolist()}

    for it in (0, 7, 1234):
        rank0, rank1 = windows(train_key(1337, it, 0 * 1 + 0)), windows(train_key(1337, it, 1 * 1 + 0))
        single = windows(train_key(1337, it, 0)) | windows(train_key(1337, it, 1))
        assert rank0 | rank1 == single
        assert not rank0 & rank1
        assert windows(train_key(1337, it, 1)) == rank1  # a pure function: the same after a restart
