"""Attention heatmaps: what each head of each layer looks at, for a prompt you choose.

    python tools/attention.py --out_dir=out-shakespeare-char --start="ROMEO:" --layers=all --heads=all --png=attn.png
    python tools/attention.py --init_from=gpt2 --start="The cat sat on the mat because it" --layers=0,5,11 --heads=0,1,2
    python tools/attention.py --init_from=path/to/hf_dir --start=FILE:prompt.txt --png=attn.png

Writes a PNG grid (one row per layer, one column per head) with the prompt's tokens on both axes (query down, key
across), the masked future in grey, and the raw weights beside it as attn.npy: float32 (layers, heads, T, T).

The model computes attention inside SDPA, which never returns the probabilities: engine/attention.py recomputes them
from the model's own modules (tests/test_attention.py checks them against the model's attention output).
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
import torch

from engine.attention import attention_weights
from engine.configurator import parse_config
from engine.errors import UserError, run_cli
from engine.files import check_output, replacing
from engine.inference import load_for_inference, read_prompt


@dataclass
class AttentionConfig:
    init_from: str = "resume"  # resume (from out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl or a HF directory
    out_dir: str = "out"  # training output directory to load from when init_from=resume
    checkpoint: str = "latest"  # which checkpoint in out_dir: latest or best (lowest val loss)
    start: str = "\n"  # the text whose attention to draw, or FILE:path to read it from a file
    layers: str = "all"  # layers to draw: all, or comma-separated indices such as 0,3
    heads: str = "all"  # heads to draw: all, or comma-separated indices
    png: str = "attn.png"  # the image to write; the weights go to the same name with .npy
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json


def pick(spec: str, n: int, what: str) -> list[int]:
    """'all' or '0,2,5' -> indices in range(n)."""
    if spec == "all":
        return list(range(n))
    try:
        chosen = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--{what}={spec!r}: write all or comma-separated indices such as 0,1") from None
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise UserError(f"--{what}: {bad} out of range; the model has {n} {what} (0..{n - 1})")
    return chosen


def draw(weights: np.ndarray, labels: list[str], layers: list[int], heads: list[int], png: str) -> None:
    """A grid of heatmaps, weights (len(layers), len(heads), T, T); the masked future drawn grey."""
    import matplotlib
    from matplotlib.figure import Figure

    T = weights.shape[-1]
    cell = min(max(2.5, 0.2 * T), 12.0)  # inches per heatmap: room for the labels, within reason
    fig = Figure(figsize=(cell * len(heads) + 1, cell * len(layers) + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(len(layers), len(heads), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # masked cells in light grey
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    every = max(1, T // 40)  # label every token up to 40, then every few
    ticks = list(range(0, T, every))
    fontsize = 8 if T <= 20 else 6
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            image = ax.imshow(np.ma.array(weights[r, c], mask=future), cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
            if c == 0:
                ax.set_ylabel("query")
            if r == len(layers) - 1:
                ax.set_xlabel("key")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    with replacing(png) as f:
        fig.savefig(f, format="png")


def token_label(tokenizer, token: int) -> str:
    """A token's text for an axis label: whitespace made visible, partial UTF-8 shown as \ufffd."""
    text = tokenizer.token_bytes(token).decode("utf-8", errors="replace")
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")


def main(argv=None):
    cfg = parse_config(AttentionConfig, argv, usage=__doc__)
    npy = os.path.splitext(cfg.png)[0] + ".npy"
    for path in (cfg.png, npy):
        check_output(path, "--png")
    model, tokenizer = load_for_inference(cfg.init_from, cfg.out_dir, cfg.checkpoint, cfg.tokenizer_dir)
    if model.config.arch != "decoder":  # an encoder's attention is not causal, an encoder-decoder's has two stacks
        raise UserError(f"{model.source} is an {model.config.arch}: attention.py draws a decoder's causal attention")
    text = read_prompt(cfg.start)
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt is empty; give some text with --start")
    if len(ids) > model.config.block_size:
        raise UserError(f"the prompt is {len(ids)} tokens, more than block_size {model.config.block_size}")
    layers = pick(cfg.layers, model.config.n_layer, "layers")
    heads = pick(cfg.heads, model.config.n_head, "heads")

    weights = attention_weights(model, torch.tensor([ids]))  # n_layer x (1, nh, T, T)
    chosen = torch.stack([weights[i][0, heads] for i in layers]).numpy()  # (layers, heads, T, T)
    with replacing(npy) as f:
        np.save(f, chosen)
    try:
        draw(chosen, [token_label(tokenizer, t) for t in ids], layers, heads, cfg.png)
    except ImportError:
        raise UserError(f"drawing needs matplotlib (pip install matplotlib); the weights are in {npy}") from None
    print(f"wrote {cfg.png} ({len(layers)} layers x {len(heads)} heads, {len(ids)} tokens) and {npy}")


if __name__ == "__main__":
    run_cli(main)
