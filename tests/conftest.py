"""Shared fixtures: a tiny model config and a tiny prepared character dataset, all on CPU."""

import os

import pytest
import torch

from model import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare.txt")

# Offline, tiktoken finds the GPT-2 encoding in the shared cache (CI sets this too).
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken_cache")


def _gpt2_tokenizer_available() -> bool:
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
        return True
    except Exception:  # offline without tiktoken's cache files: a network error
        return False


GPT2_AVAILABLE = _gpt2_tokenizer_available()
needs_gpt2_tokenizer = pytest.mark.skipif(
    not GPT2_AVAILABLE, reason="the GPT-2 tokenizer needs the network or TIKTOKEN_CACHE_DIR with tiktoken's cache files"
)


# train.py arguments for a tiny CPU run (the model of tiny_config); tests add what they vary
TINY_TRAIN = [
    "--device=cpu",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=16",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--eval_iters=2",
]


@pytest.fixture
def tiny_config() -> GPTConfig:
    """2 layers, 2 heads, n_embd 32, block 16: fast enough for every test."""
    return GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shakespeare_text(n_chars: int = 200_000) -> str:
    """The start of tiny-shakespeare when ../shared has it, else a synthetic text with a similar alphabet."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read(n_chars)
    # every letter in both cases and the usual punctuation, so prompts like "ROMEO:" stay inside the vocabulary
    words = [
        "the",
        "king",
        "and",
        "queen",
        "of",
        "rome",
        "speak",
        "now",
        "First Citizen:",
        "\n",
        "ROMEO:",
        "JULIET:",
        "THE QUICK BROWN FOX JUMPS OVER A LAZY DOG.",
        "the quick brown fox jumps over a lazy dog,",
        "Bcy;",
        "what?",
        "yes!",
        "'tis",
        "-",
        "&",
        "$3",
    ]
    g = torch.Generator().manual_seed(0)
    return " ".join(words[i] for i in torch.randint(len(words), (n_chars // 4,), generator=g).tolist())[:n_chars]


@pytest.fixture
def char_data(tmp_path):
    """A prepared character dataset in tmp_path/data/tiny_char (via prepare/shakespeare_char.py). Returns the
    data root; train with --data_root=<it> --dataset=tiny_char."""
    import shakespeare_char

    out = tmp_path / "data" / "tiny_char"
    out.mkdir(parents=True)
    (out / "input.txt").write_text(shakespeare_text(), encoding="utf-8")
    shakespeare_char.main(["--out", str(out)])
    return str(tmp_path / "data")
