"""A trained model and its tokenizer, ready for inference: what sample.py, attention.py and evaluate.py load.

init_from is "resume" (a checkpoint in out_dir, newest or best by val loss, decoded with the tokenizer its training
data was prepared with), a GPT-2 hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local Hugging Face directory
(both decoded with the GPT-2 BPE).
"""

import os

from checkpoint import find_checkpoint, load_weights, read_meta
from data import Tokenizer
from errors import UserError
from model import GPT, GPTConfig

GPT2_TOKENIZER = {"tokenizer": "gpt2", "eot_id": 50256}


def load_for_inference(
    init_from: str, out_dir: str, checkpoint: str = "latest", tokenizer_dir: str | None = None, log=print
) -> tuple[GPT, Tokenizer]:
    """The model in eval mode on the CPU (dropout off), and its tokenizer."""
    if init_from == "resume":
        path = find_checkpoint(out_dir, checkpoint, log=log)
        meta = read_meta(path)
        model = GPT(GPTConfig(**(meta["model_config"] | {"dropout": 0.0})))
        load_weights(path, model)
        tokenizer = Tokenizer(meta["data"], tokenizer_dir)
    else:
        model = GPT.from_pretrained(init_from)
        tokenizer = Tokenizer(GPT2_TOKENIZER, tokenizer_dir)
    return model.eval(), tokenizer


def read_prompt(start: str) -> str:
    """The prompt text: `start` itself, or the contents of the file named by FILE:path."""
    if not start.startswith("FILE:"):
        return start
    file = start.removeprefix("FILE:")
    if not os.path.isfile(file):
        raise UserError(f"prompt file {file!r} not found")
    with open(file, encoding="utf-8") as f:
        return f.read()
