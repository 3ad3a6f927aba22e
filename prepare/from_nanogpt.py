"""Bring your nanoGPT work: its datasets and its checkpoints, converted in place or beside, nothing copied.

    python prepare/from_nanogpt.py data/shakespeare_char                    # a nanoGPT dataset: writes its meta.json
    python prepare/from_nanogpt.py data/openwebtext                         # bare train.bin/val.bin: GPT-2 BPE (uint16)
    python prepare/from_nanogpt.py out/ckpt.pt --out_dir=out-nano           # a nanoGPT checkpoint -> one of ours
    python prepare/from_nanogpt.py out-shakespeare-char --out_dir=out-nano  # or its run directory (holding ckpt.pt)
    python prepare/from_nanogpt.py --ckpt=out/ckpt.pt --out_dir=out-nano --data_dir=data/shakespeare_char

A dataset directory keeps its train.bin and val.bin as they are (nanoGPT's flat uint16 ids are our format too); this
writes the meta.json that describes them. A character dataset's vocabulary comes from nanoGPT's meta.pkl, read with
an unpickler that builds only dicts, lists, strings and numbers: a meta.pkl that would run code is refused. Without
meta.pkl the ids are GPT-2's (vocab 50257), as nanoGPT's openwebtext and shakespeare scripts write them. Every id is
checked against the vocabulary.

A checkpoint (loaded with weights_only=True; `_orig_mod.` prefixes of a compiled model stripped) becomes
<out_dir>/ckpt-<iter>/ with its model config (nanoGPT's GELU is the exact one: mlp="gelu"), iteration, best val loss,
the train config it ran with, and its AdamW state when it maps onto ours, so `train.py --init_from=resume` continues
it. The data it was trained on (--data_dir, default data/<its dataset>) gives the tokenizer, and is imported first
when it is still nanoGPT's.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the training code at the root
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
import torch
from token_writer import FORMAT
from tqdm import tqdm

from engine.checkpoint import code_version, list_checkpoints, save_checkpoint  # noqa: E402
from engine.configurator import parse_config, resolve_options  # noqa: E402
from engine.data import TokenData, load_data  # noqa: E402
from engine.errors import UserError, run_cli  # noqa: E402
from engine.files import write_file
from engine.fsdp import optimizer_state  # noqa: E402
from engine.memory import check_fits  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.out_dir_lock import OutDirLock
from engine.schemas import MAX_JSON_BYTES, NanoCheckpoint, NanoMetaPkl, OptimizerState, check, label, short  # noqa: E402
from engine.tokenization import TokenizerUnavailable, chars_hash, encoding_hash, load_encoding
from model import GPT, GPTConfig  # noqa: E402

GPT2_VOCAB, GPT2_EOT = 50257, 50256
CHUNK = 1 << 24  # tokens read at a time when checking a split
TRAIN_PY = os.path.join(ROOT, "train.py")  # whose options a converted checkpoint's train config holds
MAX_ARGUMENT_CHARS = 4096  # a config value longer than this is no setting; Linux refuses arguments over 128 KiB


@dataclass
class ImportConfig:
    data_dir: str | None = None  # a nanoGPT dataset directory (train.bin, val.bin, maybe meta.pkl)
    ckpt: str | None = None  # a nanoGPT checkpoint to convert: its ckpt.pt, or the run directory (out_dir) holding it
    out_dir: str | None = None  # with ckpt: the new run directory for the converted checkpoint
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer files, for the vocabulary hash of a GPT-2 dataset


class DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers, nothing else: any class or function a pickle names (the way
    a payload runs code) is refused before it is looked up."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data is read")


def read_meta_pkl(path: str) -> dict:
    """nanoGPT's meta.pkl, unpickled as plain data only and checked (engine/schemas.py NanoMetaPkl)."""
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise UserError(f"{path} is refused: larger than {MAX_JSON_BYTES >> 20} MiB, more than a vocabulary takes")
    try:
        with open(path, "rb") as f:
            meta = DataOnlyUnpickler(f).load()
    except Exception as e:  # refused classes, and whatever else malformed bytes make of the unpickler (no code runs)
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{path} is refused: {detail}; a nanoGPT meta.pkl holds only vocab_size, itos and stoi"
        ) from None
    if not isinstance(meta, dict) or not {"itos", "vocab_size"} <= meta.keys():
        raise UserError(f"{path} is not a nanoGPT meta.pkl (a dict with vocab_size, itos and stoi)")
    return check(NanoMetaPkl, meta, path)


def char_tokenizer(meta: dict, path: str) -> dict:
    """Our manifest entry for nanoGPT's character vocabulary: id i is itos[i]."""
    n, itos = meta["vocab_size"], meta["itos"]
    chars = [itos.get(i) for i in range(n)]
    if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != n:
        raise UserError(f"{path}: itos must map 0..{n - 1} to distinct single characters")
    chars = "".join(chars)
    return {"tokenizer": "char", "tokenizer_hash": chars_hash(chars), "vocab_size": n, "eot_id": None, "chars": chars}


def gpt2_tokenizer(tokenizer_dir: str | None) -> dict:
    try:
        tokenizer_hash = encoding_hash(load_encoding("gpt2", tokenizer_dir))
    except TokenizerUnavailable:  # offline without tiktoken's cache: the hash is checked once a tokenizer is found
        print("note: the GPT-2 tokenizer is not available here, so its vocabulary hash is not recorded")
        tokenizer_hash = None
    return {"tokenizer": "gpt2", "tokenizer_hash": tokenizer_hash, "vocab_size": GPT2_VOCAB, "eot_id": GPT2_EOT}


def check_split(path: str, vocab_size: int, eot_id: int | None) -> dict:
    """Manifest entry of a nanoGPT uint16 token file: every id below vocab_size, its sha256, and its document count
    (end-of-text tokens, or 1 for a character dataset)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; a nanoGPT dataset has train.bin and val.bin")
    if os.path.getsize(path) % 2:
        raise UserError(f"{path} has an odd number of bytes; nanoGPT's token files are uint16")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    sha, documents = hashlib.sha256(), 0
    for start in tqdm(range(0, len(tokens), CHUNK), desc=f"checking {os.path.basename(path)}", unit="chunk"):
        chunk = np.asarray(tokens[start : start + CHUNK])
        if chunk.size and int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise UserError(f"{path} holds token id {int(tokens[at])} at {at}, outside the vocabulary of {vocab_size}")
        sha.update(chunk.tobytes())
        documents += int(np.count_nonzero(chunk == eot_id)) if eot_id is not None else 0
    file = os.path.basename(path)
    return {"file": file, "tokens": len(tokens), "sha256": sha.hexdigest(), "documents": documents or 1}


def import_dataset(data_dir: str, tokenizer_dir: str | None = None) -> dict:
    """Write data_dir/meta.json for a nanoGPT dataset (its .bin files stay as they are) and return it."""
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        raise UserError(f"{data_dir} already has a meta.json: it is ready to train on")
    if not os.path.isdir(data_dir):
        raise UserError(f"no directory {data_dir}")
    pkl = os.path.join(data_dir, "meta.pkl")
    tokenizer = char_tokenizer(read_meta_pkl(pkl), pkl) if os.path.exists(pkl) else gpt2_tokenizer(tokenizer_dir)
    splits = {
        s: check_split(os.path.join(data_dir, f"{s}.bin"), tokenizer["vocab_size"], tokenizer["eot_id"])
        for s in ("train", "val")
    }
    source = f"nanoGPT dataset {os.path.abspath(data_dir)}" + (" (meta.pkl)" if os.path.exists(pkl) else " (GPT-2 BPE)")
    meta = {"format": FORMAT, **tokenizer, "dtype": "uint16", "source": source, "splits": splits}
    write_file(meta_path, json.dumps(meta, indent=2))  # whole, never through a symlink; a full disk is one line
    print(
        f"wrote {meta_path}: {tokenizer['tokenizer']} vocabulary of {tokenizer['vocab_size']}, "
        + ", ".join(f"{s} {e['tokens']:,} tokens" for s, e in splits.items())
    )
    return meta


def nanogpt_model_config(model_args: dict, path: str) -> GPTConfig:
    """nanoGPT's GPT: learned positions, pre-norm LayerNorm (eps 1e-5, optional bias), exact GELU, tied embeddings.
    model_args (typed by engine/schemas.py NanoModelArgs) is checked as a training config's model is: sizes that do not
    combine, or a model that cannot fit in memory, are refused before anything is allocated."""
    keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
    try:
        config = GPTConfig(**{k: model_args[k] for k in keys}, dropout=model_args.get("dropout", 0.0), mlp="gelu")
        check_fits(config, "cpu")
    except (ValueError, UserError) as e:
        raise UserError(f"{path}: model_args: {e}") from None
    return config


def train_defaults() -> dict:
    """train.py's options with nothing given: its defaults, as train.py itself resolves them."""
    return vars(resolve_options(TRAIN_PY, []))


def train_argument(key: str, value, default, path: str) -> str:
    """nanoGPT's config value as `--key=value` for train.py's command line, written so that the configurator's coerce
    reads back what it would read from the value itself (None as none, numbers by repr). A value no command line
    carries (a list, a tensor, ...), or a non-string where train.py's default is a string, is refused here."""
    kind = type(default).__name__ if default is not None else "number, bool or str"
    plain = value is None or isinstance(value, (bool, int, float, str))
    if not plain or (isinstance(default, str) and not isinstance(value, (str, type(None)))):
        raise UserError(f"{path}: config.{key}: {short(value)} is not a {kind}")
    try:
        text = "none" if value is None else value if isinstance(value, str) else repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = None
    if text is None or len(text) > MAX_ARGUMENT_CHARS or "\0" in text:
        raise UserError(f"{path}: config.{key}: {short(value)} cannot be given on train.py's command line")
    return f"--{key}={text}"


def nanogpt_train_config(nano: dict, path: str, defaults: dict | None = None) -> dict:
    """nanoGPT's config (its train.py's globals) as train.py's options, nanoGPT's names being ours: the keys train.py
    knows are given to it as a command line and resolved by it, so each value is coerced to its option's type and the
    whole checked as train.py checks a command line. defaults: train_defaults(), when the caller has them already."""
    defaults = train_defaults() if defaults is None else defaults
    keys = sorted(defaults.keys() & nano.keys())
    argv = [train_argument(k, nano[k], defaults[k], path) for k in keys]
    try:
        return vars(resolve_options(TRAIN_PY, argv))
    except UserError as e:
        line = str(e)
        wrong_type = re.fullmatch(r"(\w+)=.* (is not a .*)", line)  # the configurator's coerce: key='value' is not a
        if wrong_type and wrong_type.group(1) in keys:
            key = wrong_type.group(1)
            raise UserError(f"{path}: config.{key}: {short(nano[key])} {wrong_type.group(2)}") from None
        line = line.removeprefix("bad config: ")  # parse_config's prefix for the dataclass' own checks
        raise UserError(f"{path}: config: {' '.join(line.split())[:300]}") from None  # on one line


def nanogpt_weights(state: dict) -> dict:
    """nanoGPT's state dict in our names: a compiled model's `_orig_mod.` prefix dropped, and the causal-mask buffer
    (`attn.bias`, saved by nanoGPT on torch without flash attention) left out."""
    weights = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return {k: v for k, v in weights.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def import_checkpoint(
    ckpt_path: str, out_dir: str, data_dir: str | None, tokenizer_dir: str | None, defaults: dict | None = None
) -> str:
    """Convert a nanoGPT ckpt.pt into out_dir/ckpt-<iter>/ and return its path. defaults: train_defaults(), when the
    caller has them already."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint file {ckpt_path}") from None
    except Exception as e:  # a pickle that names code (refused by weights_only) or a damaged file
        raise UserError(
            f"cannot load {ckpt_path} safely ({type(e).__name__}); it is damaged or not a checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= set(ckpt):
        raise UserError(f"{ckpt_path} is not a nanoGPT checkpoint (no model and model_args)")
    check(NanoCheckpoint, ckpt, ckpt_path)  # every entry's type and range, before any is used
    nano = ckpt.get("config") or {}
    if data_dir is None:
        if not nano.get("dataset"):
            raise UserError(f"{ckpt_path}: config names no dataset; give the data it was trained on with --data_dir")
        data_dir = os.path.join("data", nano["dataset"])  # a plain name (NanoConfig): inside data/
        if not os.path.isdir(data_dir):
            raise UserError(f"{ckpt_path}: config.dataset names {data_dir}, which is not here; give it with --data_dir")

    # Everything about the checkpoint is checked before the dataset is touched: a refused import writes nothing.
    config = nanogpt_model_config(ckpt["model_args"], ckpt_path)
    model = GPT(config)
    weights = nanogpt_weights(ckpt["model"])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{ckpt_path}: the weights do not fit its model_args ({str(e).splitlines()[0][:200]})"
        ) from None
    bad = next((name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:
        raise UserError(f"{ckpt_path}: model.{label(bad)} holds non-finite weights (NaN or inf)")
    train_config = nanogpt_train_config(nano, ckpt_path, defaults)  # the train config it ran with, in our keys

    if os.path.exists(os.path.join(data_dir, "meta.json")):  # ours already: its meta.json checked as training does
        data = load_data(data_dir, 1, splits=())
    else:
        data = TokenData(data_dir, import_dataset(data_dir, tokenizer_dir))
    model_keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout", "mlp")
    train_config |= {k: getattr(config, k) for k in model_keys} | {  # as a user would write them (mlp_hidden=None)
        "data_root": os.path.dirname(os.path.abspath(data_dir)),
        "dataset": os.path.basename(os.path.normpath(data_dir)),
        "out_dir": out_dir,
        "optimizer": "adamw",
    }

    def fresh_optimizer():  # nanoGPT's groups are ours: decayed matrices, then the rest, in parameter order
        betas = (train_config["beta1"], train_config["beta2"])
        return build_optimizer(model, train_config["weight_decay"], train_config["learning_rate"], betas, "cpu")

    optimizer, note = fresh_optimizer(), "with its AdamW state"
    try:
        check(OptimizerState, ckpt.get("optimizer"), f"{ckpt_path}: optimizer")
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                if optimizer.state[p] and optimizer.state[p]["exp_avg"].shape != p.shape:
                    raise ValueError("a moment's shape differs from its parameter's")
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:  # SchemaError is a ValueError
        optimizer = fresh_optimizer()
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        note = f"without its optimizer state, which does not map onto ours ({reason}); AdamW's moments start afresh"
    state = {
        "optimizers": [optimizer_state(model, optimizer, False)],
        "scaler": {},
        "iter_num": int(ckpt.get("iter_num", 0)),
        "best_val_loss": float(ckpt.get("best_val_loss", float("inf"))),
        "skipped_steps": 0,
    }
    meta = {
        "model_config": dataclasses.asdict(config),
        "train_config": train_config,
        "data": data.fingerprint(),
        "code_version": code_version(),
        "val_loss": state["best_val_loss"],  # nanoGPT saves when val improves: this is that val loss
        "train_loss": None,
        "imported_from": os.path.abspath(ckpt_path),
    }
    lock = OutDirLock(out_dir)
    try:
        if list_checkpoints(out_dir):
            raise UserError(f"{out_dir} already holds checkpoints; give a new --out_dir")
        path = save_checkpoint(out_dir, state["iter_num"], model, state, meta)
    finally:
        lock.release()
    print(f"wrote {path} {note}")
    return path


def resume_flags(saved: dict, defaults: dict) -> str:
    """The --key=value that a resume of this checkpoint needs where they differ from the defaults (train_defaults(),
    train.py's own): the model's shape and the data, which resuming checks (add the schedule you want: max_iters,
    learning_rate, ...)."""
    keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout"] + ["data_root", "dataset"]
    return " ".join(f"--{k}={saved[k]}" for k in keys if saved.get(k) != defaults.get(k))


def checkpoint_file(path: str) -> str:
    """The ckpt.pt a nanoGPT checkpoint names: the path itself, or the file in the run directory it names (nanoGPT's
    train.py writes <out_dir>/ckpt.pt, and its users name runs by that directory)."""
    if not os.path.isdir(path):
        return path
    file = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(file):
        raise UserError(f"{path} holds no ckpt.pt: give a nanoGPT run directory (its --out_dir) or a checkpoint file")
    return file


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    positional = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    data_given = any(f.startswith("--data_dir=") for f in flags)
    for p in positional:  # a dataset directory, unless it holds ckpt.pt (a run directory) or --data_dir names one
        is_data = os.path.isdir(p) and not os.path.exists(os.path.join(p, "ckpt.pt")) and not data_given
        flags.insert(0, f"--data_dir={p}" if is_data else f"--ckpt={p}")
    cfg = parse_config(ImportConfig, flags, usage=__doc__)
    if cfg.ckpt:
        if not cfg.out_dir:
            raise UserError("--out_dir is needed with a checkpoint: the new run directory to write it into")
        defaults = train_defaults()  # resolved once: the import and the resume command both compare with them
        path = import_checkpoint(checkpoint_file(cfg.ckpt), cfg.out_dir, cfg.data_dir, cfg.tokenizer_dir, defaults)
        with open(os.path.join(path, "meta.json")) as f:
            saved = json.load(f)["train_config"]
        flags = resume_flags(saved, defaults)
        print(f"sample it:   python sample.py --out_dir={cfg.out_dir}")
        print(f"continue it: python train.py --init_from=resume --out_dir={cfg.out_dir} {flags}")
    elif cfg.data_dir:
        import_dataset(cfg.data_dir, cfg.tokenizer_dir)
    else:
        raise UserError(
            "give a nanoGPT dataset directory or checkpoint, e.g. python prepare/from_nanogpt.py data/shakespeare_char"
        )


if __name__ == "__main__":
    run_cli(main)
