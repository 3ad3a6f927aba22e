"""Shared fixtures: a tiny model config and a tiny prepared character dataset, all on CPU."""

import hashlib
import json
import os
import random
import subprocess
import urllib.request

import pytest
import torch

from model import GPT, GPTConfig

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


def row_layout(rows: list[dict]) -> list[tuple[str, int]]:
    """(kind, iter) of each metrics.jsonl row, kind told by the key only that kind has: two runs that log the same
    rows in the same order have the same layout, so their losses can then be compared kind by kind."""
    kinds = {"loss": "step", "val_loss": "eval", "rollback": "rollback", "act_rms": "health", "task_items": "task"}
    return [(next((kind for key, kind in kinds.items() if key in r), "other"), r["iter"]) for r in rows]


@pytest.fixture
def tiny_config() -> GPTConfig:
    """2 layers, 2 heads, n_embd 32, block 16: fast enough for every test."""
    return GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shakespeare_text(n_chars: int = 200_000) -> str:
    """The start of tiny-shakespeare when ../shared has it, else synthetic_play(n_chars)."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read(n_chars)
    return synthetic_play(n_chars)


def synthetic_play(n_chars: int) -> str:
    """A play generated here, the same on every machine: speeches of a few lines, each under a speaker's name,
    separated by blank lines (so it splits into documents the way the real text does), over every letter in both
    cases, digits and the usual punctuation (so prompts like "ROMEO:" encode)."""
    speakers = ["First Citizen", "ROMEO", "JULIET", "KING HENRY VI", "QUEEN MARGARET", "Second Servingman", "ALL"]
    words = (
        "the king and queen of rome speak now what yes 'tis thou art my lord good night sweet prince how fares "
        "your grace I pray you hear me Bcy; jumps over a lazy dog quick brown fox zeal vex wax judge 3 pounds -- & $ "
        "THE QUICK BROWN FOX JUMPS OVER A LAZY DOG"
    ).split()
    ends = [",", ".", "!", "?", ";", ":", ""]
    rng = random.Random(0)
    speeches, size = [], 0
    while size < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
            lines.append(line[0].upper() + line[1:] + rng.choice(ends))
        speeches.append(f"{rng.choice(speakers)}:\n" + "\n".join(lines) + "\n")
        size += len(speeches[-1]) + 1
    return "\n".join(speeches)[:n_chars]


@pytest.fixture(scope="session")
def tiny_shakespeare(tmp_path_factory) -> str:
    """The path of the real tiny-shakespeare, for the tests that compare with nanoGPT's published figures: ../shared's
    copy, else downloaded once from where prepare/shakespeare_char.py downloads it, else the test is skipped."""
    if os.path.exists(SHAKESPEARE):
        return SHAKESPEARE
    from token_writer import TINY_SHAKESPEARE_URL

    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            path.write_bytes(response.read())
    except OSError as e:  # URLError is an OSError
        pytest.skip(f"needs the real tiny-shakespeare (../shared/data/tinyshakespeare.txt, or the network: {e})")
    return str(path)


@pytest.fixture
def char_data(tmp_path):
    """A prepared character dataset in tmp_path/data/tiny_char (via prepare/shakespeare_char.py). Returns the
    data root; train with --data_root=<it> --dataset=tiny_char."""
    import shakespeare_char

    out = tmp_path / "data" / "tiny_char"
    out.mkdir(parents=True)
    (out / "input.txt").write_text(shakespeare_text(), encoding="utf-8")
    shakespeare_char.main([f"--out={out}"])
    return str(tmp_path / "data")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A small random GPT2LMHeadModel saved in Hugging Face format (config.json + model.safetensors)."""
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the GPT-2 parity tests")
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=32,
        vocab_size=100,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,  # no early stop in HF's generate
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # every tensor random (biases and LayerNorm too), so a mis-mapped weight shows
        for name, p in hf.named_parameters():
            is_gain = ".ln_" in name and name.endswith(".weight")
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_gain else 0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(directory)  # safetensors is transformers' default (and only) format
    assert (directory / "config.json").exists() and (directory / "model.safetensors").exists()
    return hf, str(directory)


@pytest.fixture
def tiny_model(tiny_config):
    return GPT(tiny_config).eval()


def random_tokens(config: GPTConfig, batch: int, length: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, length or config.block_size), generator=g)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MB tmpfs: room for a couple of tiny checkpoints, then full. Needs mount rights (root in a container)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:100]}); the full-disk path is "
            "still tested with a simulated failure"
        )
    yield str(where)
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:  # still busy: detach it anyway
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def rehash_checkpoint(path: str) -> None:
    """COMPLETE as save_checkpoint writes it, for a checkpoint whose files a test changed: the damage is then in the
    content, as in a hostile or foreign checkpoint, not in transit."""
    hashes = {}
    for name in ("model.safetensors", "state.pt", "meta.json"):
        with open(os.path.join(path, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump(hashes, f)
