"""Sample text from a trained model or from GPT-2.

    python sample.py --out_dir=out-shakespeare-char                       # newest checkpoint in out_dir
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0 # greedy, prompt from a file
    python sample.py --help                                                # every option

Options are SampleConfig's fields below, set by preset files and then --key=value.
"""

import os
from dataclasses import dataclass

import torch

from checkpoint import find_checkpoint, load_weights, read_meta
from configurator import parse_config
from data import Tokenizer
from errors import UserError, run_cli
from model import GPT, GPTConfig
from runtime import seed_everything, setup_runtime


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (from out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl or a HF directory
    out_dir: str = "out"  # training output directory to load from when init_from=resume
    checkpoint: str = "latest"  # which checkpoint in out_dir: latest or best (lowest val loss)
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10  # samples to draw, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
    top_k: int | None = 200  # keep only the k most likely tokens; none = all
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p; none = all
    seed: int = 1337  # same seed, same device, same text
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or none, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or none, got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def main(argv=None):
    cfg = parse_config(SampleConfig, argv, usage=__doc__)
    rt = setup_runtime(cfg.device, cfg.dtype)
    seed_everything(cfg.seed)

    if cfg.init_from == "resume":
        path = find_checkpoint(cfg.out_dir, cfg.checkpoint, log=rt.print0)
        meta = read_meta(path)
        model = GPT(GPTConfig(**(meta["model_config"] | {"dropout": 0.0})))
        load_weights(path, model)
        tokenizer = Tokenizer(meta["data"], cfg.tokenizer_dir)
    else:
        model = GPT.from_pretrained(cfg.init_from)
        tokenizer = Tokenizer({"tokenizer": "gpt2", "eot_id": 50256}, cfg.tokenizer_dir)
    model.eval().to(rt.device)
    if cfg.compile:
        model = torch.compile(model)

    prompt = cfg.start
    if prompt.startswith("FILE:"):
        file = prompt.removeprefix("FILE:")
        if not os.path.isfile(file):
            raise UserError(f"prompt file {file!r} not found")
        with open(file, encoding="utf-8") as f:
            prompt = f.read()
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise UserError("the prompt is empty; give some text with --start")
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    x = torch.tensor(ids, dtype=torch.long, device=rt.device)[None].repeat(cfg.num_samples, 1)  # (num_samples, T)

    with torch.no_grad(), rt.autocast():
        y = GPT.generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    for row in y.tolist():
        print(tokenizer.decode(row))
        print("---------------")


if __name__ == "__main__":
    run_cli(main)
