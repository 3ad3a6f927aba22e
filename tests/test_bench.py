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
    assert gpu_acceptance.main(["--smoke", "--skip_char"]) == 0
    out = capsys.readouterr().out
    for label in ("checkpointing vs plain", "XL", "decode 124M, batch 1", "decode 124M, batch 8"):
        assert label in out, out
    assert out.count("greedy") == 2 and "tok/s" in out
