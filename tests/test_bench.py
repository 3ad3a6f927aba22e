"""The GPU acceptance command runs end to end at tiny shapes on CPU, and without CUDA says so in one line."""

import pytest
import torch

from bench import gpu_acceptance


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert gpu_acceptance.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU" in out[0]


@pytest.mark.slow
def test_smoke_run_prints_the_whole_table(capsys):
    assert gpu_acceptance.main(["--smoke=True", "--skip_char=True"]) == 0
    out = capsys.readouterr().out
    for label in ("checkpointing vs plain", "XL", "decode 124M, batch 1", "decode 124M, batch 8"):
        assert label in out, out
    assert out.count("greedy") == 2 and "tok/s" in out


BENCH = ["train_speed", "sample_speed", "train_overhead", "gpu_acceptance", "tokenizer_speed", "prepare_throughput"]
BENCH += ["encoder_speed", "seq2seq_speed", "checkpoint_save", "serve_throughput"]


@pytest.mark.parametrize("script", BENCH)
def test_every_bench_script_runs_as_a_plain_script(script):
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, f"bench/{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_train_speed_help_names_train_pys_options(capsys):
    from bench import train_speed

    assert train_speed.main(["--help"]) is None
    out = capsys.readouterr().out
    assert out.startswith(train_speed.__doc__) and "every train.py option (python train.py --help)" in out


def test_train_speed_measures_the_model_train_py_builds(char_data, capsys):
    from bench.train_speed import measure

    argv = [f"--data_root={char_data}", "--dataset=tiny_char", "--device=cpu", "--compile=False", "--n_layer=1"]
    argv += ["--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--gradient_accumulation_steps=1"]
    r = measure(argv, burn_in=1, steps=1)
    # the tiny_char vocabulary rounded up to 64 (as train.py does), not GPT-2's 50304
    from engine.data import load_data
    from model import GPT, GPTConfig

    vocab = -(-load_data(f"{char_data}/tiny_char", 8).meta["vocab_size"] // 64) * 64
    expected = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=vocab, bias=False))
    assert r["params"] == expected.num_params() and vocab < 50304


def test_tokenizer_speed_prints_both_rates(tmp_path, capsys):
    from bench import tokenizer_speed

    path = tmp_path / "text.txt"
    lines = [f"line {i}: the quick brown fox, naïve café {i * 7}\n" for i in range(300)]
    path.write_text("".join(lines), encoding="utf-8")
    tokenizer_speed.main([f"--input={path}", "--bpe_vocab_size=300", "--repeat=1"])
    out = capsys.readouterr().out
    assert "trained BPE" in out and "MB/s" in out and "tokens/byte" in out


def test_encoder_speed_times_an_encoder_next_to_the_same_decoder(char_data, capsys):
    from bench import encoder_speed

    argv = [f"--data_root={char_data}", "--dataset=tiny_char", "--device=cpu", "--compile=False", "--n_layer=1"]
    argv += ["--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--gradient_accumulation_steps=1"]
    encoder_speed.main([*argv, "--rounds=1", "--steps=1", "--burn_in=0"])
    out = capsys.readouterr().out
    assert out.startswith("decoder: ") and "\nencoder: " in out and "encoder / decoder: time " in out
    flops = float(out.rsplit("FLOPs (PaLM count) ", 1)[1])
    assert 1 < flops < 1.5  # the MLM head on top of the same blocks (a large share of a model this tiny)


def test_seq2seq_speed_times_the_cached_and_uncached_decoder(capsys):
    from bench import seq2seq_speed

    flags = ["--batch_sizes=1,2", "--source_tokens=6", "--new_tokens=5", "--n_layer=1", "--n_embd=16", "--n_head=2"]
    rows = seq2seq_speed.main([*flags, "--vocab_size=50"])
    out = capsys.readouterr().out
    assert [r["batch"] for r in rows] == [1, 2] and all(r["cached"] > 0 and r["uncached"] > 0 for r in rows)
    assert "| batch | cached tok/s | uncached tok/s | cached / uncached |" in out


@pytest.mark.slow
def test_checkpoint_save_bench_prints_its_figures_at_tiny_sizes(capsys):
    from bench import checkpoint_save

    tiny = ["--processes=2", "--n_layer=1", "--n_embd=32", "--n_head=2", "--vocab_size=64", "--block_size=8"]
    assert checkpoint_save.main([*tiny, "--steps=2", "--save_every=1"]) == 0
    out = capsys.readouterr().out
    for label in ("gathered (one file)", "sharded (DCP)", "sharded and asynchronous", "2 sync saves", "2 async saves"):
        assert label in out, out


def test_serve_throughput_prints_one_row_per_number_of_clients(capsys):
    from bench import serve_throughput

    serve_throughput.main(["--clients=1,3", "--new_tokens=6", "--requests_per_client=1", "--max_batch=2"]
                          + ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16"])  # fmt: skip
    out = capsys.readouterr().out
    assert "sample.py decoder, one stream" in out and "serve.py, 1 concurrent client " in out
    three = next(line for line in out.splitlines() if line.startswith("serve.py, 3 concurrent clients"))
    # three clients on two rows: each step decoded one or two rows (how often two overlap depends on the machine's
    # load, so no more is asserted here; tests/test_batching.py checks that requests queued together share steps)
    assert 1 <= float(three.split()[-1]) <= 2
