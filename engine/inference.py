"""A trained model and its tokenizer, ready for inference: what sample.py, tools/attention.py and tools/evaluate.py
load.

init_from is "resume" (a checkpoint in out_dir, newest or best by val loss, decoded with the tokenizer its training
data was prepared with), a GPT-2 hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; decoded with the GPT-2 BPE) or
a local Hugging Face directory (decoded with its own tokenizer.json when it has one, as our exports do, else GPT-2's).
"""

import os

from engine.checkpoint import load_newest_model
from engine.data import Tokenizer
from engine.errors import UserError
from engine.hf_interop import from_pretrained
from engine.lora import merge_lora
from engine.masking import own_special_tokens
from model import GPT

GPT2_TOKENIZER = {"tokenizer": "gpt2", "eot_id": 50256}


def load_for_inference(
    init_from: str,
    out_dir: str,
    checkpoint: str = "latest",
    tokenizer_dir: str | None = None,
    log=print,
    weights: str = "raw",
) -> tuple[GPT, Tokenizer]:
    """The model in eval mode on the CPU (dropout off), and its tokenizer. model.source says where it came from.
    weights="ema" takes a checkpoint's moving average of its weights."""
    if init_from == "resume":
        path, model, meta = load_newest_model(out_dir, checkpoint, log=log, weights=weights)
        merge_lora(model)  # a LoRA run decodes with its adapters folded in: one matmul per layer
        average = ", EMA weights" if weights == "ema" else ""
        model.source = f"{path} (iteration {meta.get('iter_num')}, val loss {meta.get('val_loss')}{average})"
        model.special = meta.get("encoder", {}).get("special")  # an encoder's [CLS], [SEP], [MASK], [PAD]
        model.labels = (meta["data"].get("classify") or {}).get("labels")  # a classifier's, in index order
        tokenizer = Tokenizer(meta["data"], tokenizer_dir)
        if model.config.arch == "encoder_decoder" and model.special:  # span corruption's <pad>, </s>, sentinels
            tokenizer.special |= model.special  # (ids after the text's: decoded by name, and sampled)
            tokenizer.special_by_id = {i: token for token, i in tokenizer.special.items()}
    else:
        model = from_pretrained(init_from)
        model.source, model.special = init_from, None
        model.labels = getattr(model, "labels", None)  # a classifier's (config.json's id2label)
        own = os.path.join(init_from, "tokenizer.json")
        if os.path.isfile(own):  # the directory's own tokenizer (an export of ours has one)
            tokenizer = Tokenizer({"tokenizer": "tokenizer.json", "path": own})
            if model.config.arch == "encoder":  # its [CLS], [SEP], [MASK], [PAD] (BERT's, or an export's)
                model.special = own_special_tokens(read_text(own, "tokenizer file"))
        else:
            tokenizer = Tokenizer(GPT2_TOKENIZER, tokenizer_dir)
    return model.eval(), tokenizer


def read_prompt(start: str) -> str:
    """The prompt text: `start` itself, or the contents of the file named by FILE:path."""
    if not start.startswith("FILE:"):
        return start
    return read_text(start.removeprefix("FILE:"), "prompt file")


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file's contents; a missing, unreadable or non-UTF-8 file is one line saying so."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path!r} ({e.strerror})") from None
