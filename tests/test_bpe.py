"""A BPE trained on your own corpus (prepare/text.py --tokenizer=bpe): the saved tokenizer.json, loaded by the
`tokenizers` library itself, re-encodes every validation document to exactly the ids in val.bin; any Unicode text
round-trips; streamed decoding never splits a character; bits per byte count the text's own bytes, so they compare
across tokenizers; the same file reused gives the same dataset; a run refuses to resume on data of another BPE."""

import json
import os
import random

import numpy as np
import pytest
import text
from test_train import TINY

import train
from engine.data import Tokenizer, load_data
from engine.errors import UserError
from engine.generate import StreamDecoder
from tools.evaluate import text_bytes

WORDS = "the cat sat on mat où est la café 東京 で 食べた 🎉 naïve façade Ωmega".split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for i in range(n)]


def prepare(tmp_path, *extra, name="bpe") -> str:
    source = tmp_path / "corpus.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        source.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    out = tmp_path / "data" / name
    text.main(
        [f"--input={source}", "--sample_by=line", f"--out={out}", "--num_proc=1", *extra]
        + [f"--cache_dir={tmp_path / 'cache'}"]
    )
    return str(out)


def test_the_saved_tokenizer_re_encodes_every_val_document_to_val_bin(tmp_path):
    from tokenizers import Tokenizer as HF

    out = prepare(tmp_path, "--tokenizer=bpe", "--bpe_vocab_size=400")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert (
        meta["tokenizer"] == "tokenizer.json"
        and meta["vocab_size"] == 400
        and meta["special_tokens"] == ["<|endoftext|>"]
    )
    hf = HF.from_file(os.path.join(out, "tokenizer.json"))
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16).tolist()
    docs, current = [], []
    for t in val:
        if t == meta["eot_id"]:
            docs.append(current)
            current = []
        else:
            current.append(t)
    originals = {
        hf.encode(d, add_special_tokens=False).ids and tuple(hf.encode(d, add_special_tokens=False).ids): d
        for d in corpus()
    }
    assert len(docs) == meta["splits"]["val"]["documents"] == 40
    for ids in docs:
        assert tuple(ids) in originals  # every val document is one of the corpus lines, encoded by the saved file
    assert len(set(map(tuple, docs))) == 40


def test_any_unicode_round_trips_and_streams_whole_characters(tmp_path):
    out = prepare(tmp_path, "--tokenizer=bpe", "--bpe_vocab_size=300")
    tok = Tokenizer(load_data(out, block_size=8).meta)
    rng = random.Random(1)
    for _ in range(50):
        s = "".join(
            chr(
                rng.choice(
                    [
                        rng.randint(32, 126),
                        rng.randint(0xA0, 0x2FFF),
                        rng.randint(0x1F300, 0x1F64F),
                        rng.randint(0x4E00, 0x9FFF),
                        0x301,
                        10,
                        9,
                    ]
                )
            )
            for _ in range(rng.randint(1, 40))
        )
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        stream = StreamDecoder(tok.token_bytes)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == s


def test_bits_per_byte_count_the_texts_own_bytes_for_every_tokenizer(tmp_path):
    sample = " ".join(corpus(20, seed=5))  # line-split documents: their characters, not the newlines
    for kind in ("--tokenizer=bpe", "--tokenizer=char"):
        out = prepare(tmp_path / kind[12:], kind, "--bpe_vocab_size=500")
        tok = Tokenizer(load_data(out, block_size=8).meta)
        assert text_bytes(tok, tok.encode(sample)) == len(sample.encode("utf-8"))


def test_a_reused_tokenizer_gives_the_same_dataset_and_resume_refuses_another(tmp_path):
    first = prepare(tmp_path, "--tokenizer=bpe", "--bpe_vocab_size=400")
    again = prepare(tmp_path, f"--tokenizer={first}/tokenizer.json", name="again")
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(again, name), "rb").read()
    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    run = [f"--data_root={root}", "--dataset=bpe", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2"]
    train.main(run)
    prepare(tmp_path, "--tokenizer=bpe", "--bpe_vocab_size=300")  # data/bpe re-prepared with another vocabulary
    with pytest.raises(UserError, match="tokenizer_hash"):
        train.main([*run[:-2], "--max_iters=4", "--eval_interval=2", "--init_from=resume"])


def test_a_tokenizer_file_without_an_end_of_text_token_is_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    path = tmp_path / "plain.json"
    HF(models.BPE()).save(str(path))
    with pytest.raises(SystemExit):
        prepare(tmp_path, f"--tokenizer={path}")
    assert "has no <|endoftext|> token" in capsys.readouterr().err
