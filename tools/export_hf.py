"""Export a trained checkpoint as a Hugging Face directory that transformers.AutoModelForCausalLM loads (an encoder:
AutoModelForMaskedLM, a classifier: AutoModelForSequenceClassification).

    python tools/export_hf.py --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('hf-shakespeare-char')"

GPT-2-style models (learned positions, LayerNorm, GELU/ReLU MLP, multi-head attention; without biases they get zero
ones) are written in the GPT-2 layout, Llama-style ones (RoPE, RMSNorm, SwiGLU, any n_kv_head) in the Llama layout;
other combinations (ALiBi, sinusoidal or no positions, post-norm, QK-norm, MoE) are refused, naming what breaks each
layout. The tokenizer the model was trained with goes along as tokenizer.json (the `tokenizers` library's format:
byte-level BPE for a tiktoken encoding, one token per character for a character vocabulary), so
`transformers.pipeline("text-generation", model=hf_dir)` and AutoTokenizer work, and sample.py reads it back.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

from safetensors import SafetensorError

from engine import chat
from engine.checkpoint import list_checkpoints, load_newest_model
from engine.configurator import parse_config
from engine.errors import UserError, run_cli
from engine.files import TEMPORARY, disk_full, staged_files
from engine.hf_interop import EXPORT_FILES, UnsupportedModel, save_hf
from engine.lora import merge_lora
from engine.out_dir_lock import LOCK_NAME
from engine.tokenization import (
    TokenizerUnavailable,
    bpe_tokenizer_json,
    char_tokenizer_json,
    endoftext_as_vocabulary,
    load_encoding,
    tokenizer_from_json,
)


@dataclass
class ExportConfig:
    out_dir: str = "out"  # training output directory holding the checkpoint
    checkpoint: str = "latest"  # latest or best (lowest val loss), or a checkpoint directory given as out_dir
    hf_dir: str = "hf_model"  # directory to write config.json and model.safetensors into (new or empty)
    overwrite: bool = False  # replace an earlier export in hf_dir (a directory holding only what an export writes)
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json
    weights: str = "raw"  # raw, or ema: the moving average of a run trained with --ema_decay


def check_hf_dir(hf_dir: str, out_dir: str, overwrite: bool) -> None:
    """Refuse, before any work, an hf_dir that cannot be written or whose files would be lost: a file, one of
    out_dir's checkpoints (or a directory holding one), a training run's out_dir or a dataset (never, whatever
    overwrite says), or a non-empty directory (unless overwrite, and then only an earlier export: a directory holding
    nothing but the files an export writes). Only names are compared: no checkpoint is read or hashed here."""
    here = os.path.realpath(hf_dir)
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise UserError(f"--hf_dir={hf_dir} is a file; give a directory")
    ckpts = [out_dir] if os.path.exists(os.path.join(out_dir, "COMPLETE")) else list_checkpoints(out_dir)
    held = [os.path.realpath(c) for c in ckpts]
    inside = any(here == c or here.startswith(c + os.sep) or c.startswith(here + os.sep) for c in held)
    if os.path.isdir(hf_dir):
        names = set(os.listdir(hf_dir))
        if inside or "COMPLETE" in names or LOCK_NAME in names or "metrics.jsonl" in names or list_checkpoints(hf_dir):
            raise UserError(
                f"--hf_dir={hf_dir} holds a checkpoint or a training run, which the export would overwrite; "
                "give a new directory"
            )
        if names and not overwrite:
            raise UserError(f"--hf_dir={hf_dir} is not empty; give a new directory, or add --overwrite=True")
        foreign = sorted(n for n in names - set(EXPORT_FILES) if TEMPORARY not in n)  # (a killed export's debris)
        if foreign:
            raise UserError(
                f"--hf_dir={hf_dir} holds files an export does not write ({', '.join(foreign[:3])}); --overwrite=True "
                "replaces an earlier export only: give a new directory"
            )
    elif inside:
        raise UserError(f"--hf_dir={hf_dir} is inside a checkpoint of {out_dir}; give a directory outside it")
    parent = os.path.dirname(here)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent if not os.path.isdir(hf_dir) else hf_dir, os.W_OK):
        raise UserError(f"cannot write --hf_dir={hf_dir} (no permission or not a directory); choose another")


def hf_tokenizer(data: dict, tokenizer_dir: str | None, encoder_special: dict | None = None):
    """(tokenizers.Tokenizer, ids it decodes) for the tokenizer a checkpoint's data was prepared with, the chat
    template's special tokens included (as special tokens, at the ids training gave them). <|endoftext|> is an
    ordinary vocabulary entry, so "<|endoftext|>" written in a prompt or a message encodes as text, as in training.
    An encoder's special tokens (encoder_special) are added as special tokens too, with a post-processor that reads
    `[CLS] text [SEP]`, as training does."""
    if data.get("tokenizer") == "char":
        tokenizer, vocab = char_tokenizer_json(data["chars"]), len(data["chars"])
    elif data.get("tokenizer_json"):  # a BPE trained for the dataset: the same tokenizer.json
        tokenizer = tokenizer_from_json(data["tokenizer_json"], "the checkpoint's tokenizer")
        vocab = tokenizer.get_vocab_size()
    else:
        try:
            enc = load_encoding(data["tokenizer"], tokenizer_dir)
        except TokenizerUnavailable as e:
            raise UserError(f"the export needs the model's tokenizer: {e}") from None
        tokenizer, vocab = bpe_tokenizer_json(enc), enc.n_vocab
    tokenizer = endoftext_as_vocabulary(tokenizer)
    if data.get("chat"):
        from tokenizers import AddedToken

        special = data["chat"]["special"]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        assert all(tokenizer.token_to_id(t) == i for t, i in special.items()), "chat token ids moved"
        vocab += len(special)
    if data.get("seq2seq"):  # an encoder-decoder's <pad> and </s>, and sources read as `source </s>` as in training
        from tokenizers import AddedToken
        from tokenizers.processors import TemplateProcessing

        special = data["seq2seq"]["special"]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        assert all(tokenizer.token_to_id(t) == i for t, i in special.items()), "seq2seq token ids moved"
        vocab = max(vocab, 1 + max(special.values()))
        end = ("</s>", special["</s>"])
        tokenizer.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[end])
    if encoder_special:  # an encoder's [CLS], [SEP], [MASK], [PAD], and inputs built as training built them
        from tokenizers import AddedToken
        from tokenizers.processors import TemplateProcessing

        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in encoder_special])
        assert all(tokenizer.token_to_id(t) == i for t, i in encoder_special.items()), "encoder token ids moved"
        vocab = max(vocab, 1 + max(encoder_special.values()))  # (BERT's WordPiece has them in its vocabulary)
        cls, sep = (("[CLS]", encoder_special["[CLS]"]), ("[SEP]", encoder_special["[SEP]"]))
        tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
    return tokenizer, vocab


def main(argv=None):
    cfg = parse_config(ExportConfig, argv, usage=__doc__)
    check_hf_dir(cfg.hf_dir, cfg.out_dir, cfg.overwrite)
    path, model, meta = load_newest_model(cfg.out_dir, cfg.checkpoint, weights=cfg.weights)
    merge_lora(model)  # a LoRA run exports as a plain model: its adapters folded into the weights
    special, data = meta.get("encoder", {}).get("special"), meta["data"]
    if model.config.arch == "encoder_decoder" and special:  # <pad>, </s> (and span corruption's sentinels)
        data = data | {"seq2seq": {"special": special}}
    tokenizer, vocab = hf_tokenizer(data, cfg.tokenizer_dir, special if model.config.arch == "encoder" else None)
    chatting = meta["data"].get("chat")
    eos = chatting["special"][chat.END] if chatting else meta["data"].get("eot_id")  # a reply ends at <|end|>
    if data.get("seq2seq"):  # an encoder-decoder's output ends at </s>
        eos = data["seq2seq"]["special"]["</s>"]
    try:
        with staged_files(cfg.hf_dir) as staging:  # all files written, then renamed in: a failure changes nothing
            template = chat.jinja_template() if chatting else None
            labels = (meta["data"].get("classify") or {}).get("labels")  # a classifier's
            layout = save_hf(model, staging, eos, tokenizer, vocab, template, labels)
    except UnsupportedModel as e:
        raise UserError(f"cannot export {path}: {e}") from None
    except (RuntimeError, SafetensorError) as e:  # safetensors' word for a failed write
        if disk_full(e, os.path.dirname(os.path.abspath(cfg.hf_dir))):
            raise UserError(f"disk full writing {cfg.hf_dir}; nothing was exported; free space and run again") from None
        raise UserError(f"cannot write {cfg.hf_dir} ({str(e)[:200]}); choose another --hf_dir") from None
    print(f"wrote {path} to {cfg.hf_dir} in the Hugging Face {layout} layout")


if __name__ == "__main__":
    run_cli(main)
