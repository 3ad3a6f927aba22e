"""tools/evaluate.py: the sliding window against hand-made references (non-overlapping chunks; one forward over
everything), bits per byte by its definition on text with multi-byte characters, and the command line."""

import dataclasses
import json
import math
import os
import re

import pytest
import torch
from torch.nn import functional as F

from engine.checkpoint import save_checkpoint
from engine.data import load_data
from model import GPT
from tools import evaluate


@pytest.fixture
def model(tiny_config):
    return GPT(tiny_config).eval()


def test_windows_score_every_target_once():
    for n, block, stride in [(2, 16, 8), (40, 16, 8), (40, 16, 16), (41, 16, 5), (17, 16, 1), (100, 7, 3)]:
        plan = evaluate.windows(n, block, stride)
        scored = [j for _, end, new in plan for j in range(new, end)]
        assert scored == list(range(n - 1))
        assert all(end - begin <= block and begin <= new for begin, end, new in plan)
    with pytest.raises(evaluate.UserError):
        evaluate.windows(40, 16, 17)


def test_stride_block_size_is_non_overlapping_chunks(model, tiny_config):
    ids = torch.randint(tiny_config.vocab_size, (50,))
    T = tiny_config.block_size
    nll = evaluate.token_nll(model, ids, stride=T, batch_size=3)
    # by hand: chunks of T inputs, each a separate forward with its own targets
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, T):
        x, y = ids[begin : begin + T], ids[begin + 1 : begin + T + 1]
        x = x[: len(y)]
        _, loss = model(x[None], y[None])
        total, count = total + loss.item() * len(y), count + len(y)
    assert nll.shape == (49,)
    assert math.isclose(nll.mean().item(), total / count, rel_tol=1e-5)


def test_window_covering_everything_is_one_forward(model, tiny_config):
    ids = torch.randint(tiny_config.vocab_size, (tiny_config.block_size + 1,))
    logits, _ = model(ids[None, :-1], all_logits=True)
    by_hand = -F.log_softmax(logits[0], -1)[torch.arange(len(ids) - 1), ids[1:]]
    for stride in (1, 5, tiny_config.block_size):  # one window, whatever the stride
        assert torch.allclose(evaluate.token_nll(model, ids, stride=stride), by_hand, atol=1e-5)


def test_sliding_window_gives_context(model, tiny_config):
    ids = torch.randint(tiny_config.vocab_size, (60,))
    nll = evaluate.token_nll(model, ids, stride=4, batch_size=2)
    # windows start every 4 tokens and hold 16; target 40 (token 41) is first reached by the window starting at 28,
    # so it is predicted from tokens 28..40: 13 of context, between block_size - stride + 1 and block_size
    logits, _ = model(ids[None, 28:41])
    assert math.isclose(nll[40].item(), F.cross_entropy(logits[0, -1], ids[41]).item(), rel_tol=1e-5)


def gpt2_checkpoint(tiny_config, out_dir) -> None:
    config = dataclasses.replace(tiny_config, vocab_size=50257)
    meta = {"model_config": dataclasses.asdict(config), "train_config": {}}
    meta["data"] = {"tokenizer": "gpt2", "eot_id": 50256, "vocab_size": 50257}
    save_checkpoint(out_dir, 1, GPT(config), {}, meta)


def printed(text: str) -> dict[str, float]:
    """The numbers evaluate.main prints."""
    m = re.search(r"scored ([\d,]+) tokens \(([\d,]+) bytes\)", text)
    return {
        "tokens": int(m.group(1).replace(",", "")),
        "bytes": int(m.group(2).replace(",", "")),
        "loss": float(re.search(r"loss ([\d.]+) nats", text).group(1)),
        "perplexity": float(re.search(r"perplexity ([\d.]+)", text).group(1)),
        "bpb": float(re.search(r"bits per byte ([\d.]+)", text).group(1)),
    }


def test_bits_per_byte_on_utf8_text(tiny_config, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    config = dataclasses.replace(tiny_config, vocab_size=50257)
    meta = {"model_config": dataclasses.asdict(config), "train_config": {}}
    meta["data"] = {"tokenizer": "gpt2", "eot_id": 50256, "vocab_size": 50257}
    save_checkpoint(out_dir, 1, GPT(config), {}, meta)
    text = "Café crème, naïve façade: 東京 and Zürich. " * 3
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    surprisal = tmp_path / "s.jsonl"
    try:
        evaluate.main(
            [
                f"--out_dir={out_dir}",
                f"--text={tmp_path / 't.txt'}",
                "--device=cpu",
                "--stride=4",
                f"--surprisal={surprisal}",
            ]
        )
    except evaluate.UserError as e:  # the GPT-2 tokenizer is not available offline here
        pytest.skip(str(e))
    got = printed(capsys.readouterr().out)
    # the end-of-text token put before the text makes every text token scored, so the bytes are the whole text's
    assert got["bytes"] == len(text.encode("utf-8")) > len(text)
    assert got["tokens"] == len(evaluate.Tokenizer(meta["data"]).encode(text))
    assert math.isclose(got["bpb"], got["loss"] * got["tokens"] / got["bytes"] / math.log(2), rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(got["loss"]), rel_tol=1e-5)
    records = [json.loads(line) for line in surprisal.read_text(encoding="utf-8").splitlines()]
    assert len(records) == got["tokens"]
    mean_bits = sum(r["surprisal_bits"] for r in records) / len(records)
    assert math.isclose(mean_bits * math.log(2), got["loss"], rel_tol=1e-5)


def test_token_file(char_data, tiny_config, tmp_path, capsys):
    data = load_data(os.path.join(char_data, "tiny_char"), tiny_config.block_size)
    config = dataclasses.replace(tiny_config, vocab_size=data.meta["vocab_size"])
    meta = {"model_config": dataclasses.asdict(config), "train_config": {}, "data": data.fingerprint()}
    save_checkpoint(str(tmp_path / "out"), 1, GPT(config), {}, meta)
    val = data.split_path("val")
    evaluate.main([f"--out_dir={tmp_path / 'out'}", f"--tokens={val}", "--max_tokens=100", "--device=cpu"])
    got = printed(capsys.readouterr().out)
    assert got["tokens"] == 99 and got["bytes"] == 99  # ASCII characters; the first is context only
    assert math.isclose(got["bpb"], got["loss"] / math.log(2), rel_tol=1e-5)
    with pytest.raises(evaluate.UserError, match="not a split"):
        evaluate.main([f"--out_dir={tmp_path / 'out'}", f"--tokens={os.path.join(char_data, 'tiny_char', 'x.bin')}"])
