"""The only code that reads or writes checkpoints.

A checkpoint is a directory out_dir/ckpt-<iter>/ (ckpt-<iter>-r<n> once the run has rolled back n times) holding
    model.safetensors   the uncompiled, unwrapped model's weights (never `_orig_mod.` or `module.` keys)
    state.pt            optimizer, GradScaler and loop state; plain tensors and numbers, loaded with weights_only=True
    meta.json           model config, train config, data fingerprint, iteration and val loss, for humans and tools
    COMPLETE            sha256 of each file above, written last
A sharded run's (FSDP) holds shards/ instead of model.safetensors: every rank's pieces of the weights, optimizer
moments and weight average (engine/sharded_checkpoint.py), written by each rank in the background while training
goes on (ShardedSave), state.pt keeping the rest; readers in one process put the pieces together (load_weights,
load_state), and a sharded run reads its own pieces alone, on any number of ranks.
It is written under a temporary name and renamed into place, so a crash at any moment leaves earlier checkpoints
intact; older ones are deleted only after the new one is complete. Loading verifies the hashes and skips a
corrupt checkpoint for the one before it, saying so. Nothing in a checkpoint is ever executed.

remove_debris clears what a writer that died (kill -9, power loss) left behind; engine/out_dir_lock.py calls it once
it holds out_dir.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import typing
from concurrent.futures import Future

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.configurator import coerce
from engine.ema import UPDATES
from engine.errors import UserError
from engine.files import TEMPORARY, UMASK, disk_full, fresh_dir
from engine.fsdp import load_model_state
from engine.lora import add_lora
from engine.memory import check_fits
from engine.schemas import (
    CheckpointMeta,
    ModelConfig,
    TokenizerJson,
    TrainingState,
    check,
    label,
    parse_json,
    read_json,
    short,
)
from engine.sharded_checkpoint import SHARDS, read_shards, shard_shapes, write_shards
from model import GPT, GPTConfig

_NAME = re.compile(r"^ckpt-(\d+)(?:-r(\d+))?$")
# engine/files' temporaries and checkpoints being replaced; the last two: the names older versions gave temporaries
_DEBRIS = re.compile(rf"^(\.old-ckpt-|(\..*)?{re.escape(TEMPORARY)}|loss_curve\.png\.tmp-|metrics\.jsonl\.tmp-)")
_FILES = ("model.safetensors", "state.pt", "meta.json")


def remove_debris(out_dir: str) -> None:
    """What a writer that died left in out_dir (call holding out_dir's lock, engine/out_dir_lock.py, so no live
    writer owns any of it): temporary checkpoint directories and plot files, a checkpoint that pruning had begun to
    delete (COMPLETE goes first, so what is left is some of its own files and nothing else; a checkpoint is renamed
    into place only whole), and a torn last line of metrics.jsonl."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        half_pruned = (
            _NAME.match(name) and os.path.isdir(path) and set(os.listdir(path)) <= {*_FILES, SHARDS}
        )  # no COMPLETE
        if (_DEBRIS.match(name) or half_pruned) and not os.path.islink(path):
            _remove(path)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and not os.path.islink(metrics) and os.path.getsize(metrics):
        with open(metrics, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a write cut short: drop the partial line (the whole file is read only then)
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)


def _remove(path: str) -> None:
    """Delete a file or a directory tree; a symlink is unlinked, never followed."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors(weights: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file readable like every other file written here: save_file creates it
    0600, so another user (or a container) serving the export could not read it."""
    save_file(weights, path, metadata=metadata)
    os.chmod(path, 0o666 & ~UMASK)


def checkpoint_name(iter_num: int, rollbacks: int = 0) -> str:
    """ckpt-<iter>, or ckpt-<iter>-r<n> after n loss-spike rollbacks. A rollback revisits iterations, and the state at
    a revisited one is another state (its rollback count, learning-rate scale and data windows): it is saved beside
    the first rather than over it, since no two directories can be swapped atomically."""
    return f"ckpt-{iter_num:07d}" + (f"-r{rollbacks}" if rollbacks else "")


def save_checkpoint(out_dir: str, iter_num: int, model, state: dict, meta: dict, rollbacks: int = 0) -> str:
    """Write checkpoint_name(iter_num, rollbacks) atomically and return its path. `model` is the raw nn.Module (not
    compiled, not DDP) or its full state dict, `state` a dict of optimizer/scaler state dicts and numbers, `meta`
    JSON-serialisable."""
    os.makedirs(out_dir, exist_ok=True)
    name = checkpoint_name(iter_num, rollbacks)
    final = os.path.join(out_dir, name)
    if os.path.exists(final) and verify_checkpoint(final) is None:
        # The same iteration again holds the same run state: keep the verified copy rather than swap directories,
        # which cannot be done atomically (a crash between two renames would lose both names).
        return final
    tmp = None
    try:
        tmp = fresh_dir(out_dir, f"{TEMPORARY}{name}-")  # ours alone: nothing planted there in advance is written to
        weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
        save_safetensors(_unique(weights), os.path.join(tmp, "model.safetensors"))
        _write_state(tmp, state, meta, iter_num)
        _seal(tmp, _FILES)
    except (OSError, RuntimeError, SafetensorError) as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(e, out_dir, iter_num) from None
    return _install(tmp, out_dir, name)


def _write_state(tmp: str, state: dict, meta: dict, iter_num: int) -> None:
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta | {"iter_num": iter_num, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=2)


def _seal(tmp: str, names) -> None:
    """fsync and hash each of the files `names` in `tmp`, then write COMPLETE, their hashes, last."""
    hashes = {}
    for name in names:
        _fsync(os.path.join(tmp, name))
        hashes[name] = _sha256(os.path.join(tmp, name))
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        json.dump(hashes, f, indent=2)
    _fsync(os.path.join(tmp, "COMPLETE"))


def _save_error(e: BaseException, out_dir: str, iter_num: int) -> BaseException:
    if not disk_full(e, out_dir):
        return e
    return UserError(
        f"disk full at {out_dir}: checkpoint {iter_num} not written, the previous checkpoint is kept; free space "
        "and continue with --init_from=resume"
    )


def _install(tmp: str, out_dir: str, name: str) -> str:
    """Rename the sealed directory `tmp` into place as out_dir/name (one there, which callers have found corrupt, is
    replaced)."""
    final = os.path.join(out_dir, name)
    old = None
    if os.path.exists(final):
        old = os.path.join(out_dir, f".old-{name}-{os.getpid()}")  # a corrupt one: replace it
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(out_dir)
    if old:
        _remove(old)
    return final


class ShardedSave:
    """A sharded checkpoint (engine/sharded_checkpoint.py) being written: every rank writes its shards of `tensors`
    into one temporary directory, in the background when asynchronous; then rank 0 alone (DCP's own index is
    written only after every rank's shards are) seals it with COMPLETE, renames it into place and prunes. A
    collective: every rank constructs it with the same arguments (state and meta matter on rank 0 only). wait(), a
    collective too, returns the checkpoint's path on every rank once rank 0 has put it in place, or raises what went
    wrong on any rank (the temporary directory gone, the previous checkpoints untouched)."""

    def __init__(self, out_dir, iter_num, rollbacks, tensors, state, meta, rt, group, asynchronous, keep_last):
        self.out_dir, self.iter_num, self.keep_last = out_dir, iter_num, keep_last
        self.name, self.master, self.error = checkpoint_name(iter_num, rollbacks), rt.master, None
        self.sealed = threading.Event()
        tmp = None
        try:
            if rt.master:
                os.makedirs(out_dir, exist_ok=True)
                tmp = fresh_dir(out_dir, f"{TEMPORARY}{self.name}-")
                _write_state(tmp, state, meta, iter_num)
        except (OSError, RuntimeError) as e:  # (torch.save reports a full disk as a RuntimeError)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            self.error = _save_error(e, out_dir, iter_num)
        # every rank learns where to write, or that rank 0 could not begin
        where = [tmp if self.error is None else None]
        torch.distributed.broadcast_object_list(where, src=0)
        self.tmp = where[0]
        if self.tmp is None:
            self.error = self.error or UserError(f"checkpoint {iter_num} not written: rank 0 could not begin it")
            self.sealed.set()
            return
        try:
            self.future = write_shards(os.path.join(self.tmp, SHARDS), tensors, group, asynchronous)
        except Exception as e:  # noqa: BLE001 (a synchronous write's failure: handled as an asynchronous one's)
            self.future = Future()
            self.future.set_exception(e)
        self.future.add_done_callback(self._finish)  # (in the writing thread, or here when already done)

    def _finish(self, future) -> None:
        try:
            future.result()
            final = os.path.join(self.out_dir, self.name)
            if self.master and os.path.exists(final) and verify_checkpoint(final) is None:
                shutil.rmtree(self.tmp, ignore_errors=True)  # the same state is there already: kept (save_checkpoint)
            elif self.master:
                shards = [f"{SHARDS}/{f}" for f in sorted(os.listdir(os.path.join(self.tmp, SHARDS)))]
                _seal(self.tmp, ("state.pt", "meta.json", *shards))
                _install(self.tmp, self.out_dir, self.name)
                prune_checkpoints(self.out_dir, self.keep_last)
        except BaseException as e:  # noqa: BLE001 (handed to wait(), on the training thread)
            if self.master:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.error = _save_error(e, self.out_dir, self.iter_num)
        finally:
            self.sealed.set()

    def wait(self) -> str:
        self.sealed.wait()
        # every rank's outcome (rank 0's: whether the checkpoint is in place), so that all go on, or all stop
        outcomes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(outcomes, None if self.error is None else str(self.error))
        if self.error is not None:
            raise self.error
        failed = next((outcome for outcome in outcomes if outcome), None)
        if failed:
            raise UserError(f"checkpoint {self.iter_num} not written: {failed}")
        return os.path.join(self.out_dir, self.name)


def _unique(weights: dict) -> dict:
    """Each tensor once: a tied lm_head is stored as transformer.wte.weight, as nn.Module order gives it (a dict
    sorted by name would give lm_head first); loading restores the tie."""
    seen, out = set(), {}
    for name, t in sorted(weights.items(), key=lambda item: item[0] == "lm_head.weight"):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous()
    return out


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint directories in out_dir that claim to be complete, oldest first (not yet verified): by iteration,
    then by rollbacks (a rollback's checkpoint of an iteration is newer than the first one)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        if m and os.path.exists(os.path.join(out_dir, name, "COMPLETE")):
            found.append((int(m.group(1)), int(m.group(2) or 0), os.path.join(out_dir, name)))
    return [path for _, _, path in sorted(found)]


def read_meta(path: str) -> dict:
    """Checkpoint `path`'s meta.json, checked against engine/schemas.py CheckpointMeta (its model_config is
    model_config_from_meta's to check): a missing key or a value of the wrong type or range is one SchemaError line
    naming the field."""
    file = os.path.join(path, "meta.json")
    return check(CheckpointMeta, read_json(file), file)


def is_sharded(path: str) -> bool:
    """Whether checkpoint `path` was written by a sharded run (its tensors in shards/, not model.safetensors)."""
    return os.path.isdir(os.path.join(path, SHARDS)) and not os.path.islink(os.path.join(path, SHARDS))


def checkpoint_losses(path: str) -> dict:
    """The losses a checkpoint's evaluation measured (none for one saved on a signal)."""
    meta = read_meta(path)
    return {"train": meta.get("train_loss"), "val": meta.get("val_loss")}


def verify_checkpoint(path: str) -> str | None:
    """None when every file matches its hash in COMPLETE, else what is wrong."""
    try:
        hashes = read_json(os.path.join(path, "COMPLETE"))
        sharded = is_sharded(path)
        names = ("state.pt", "meta.json", f"{SHARDS}/.metadata") if sharded else _FILES
        if sharded:  # the shards' files exactly as listed: none missing, none added, nothing outside the checkpoint
            present = {f"{SHARDS}/{f}" for f in os.listdir(os.path.join(path, SHARDS))}
            if present != {name for name in hashes if name.startswith(f"{SHARDS}/")}:
                return f"the files in {SHARDS}/ are not those its checksums list"
            names += tuple(sorted(present - {f"{SHARDS}/.metadata"}))
        for name in names:
            if _sha256(os.path.join(path, name)) != hashes[name]:
                return f"{name} does not match its checksum"
        # Only the outline here: a checkpoint whose files match their hashes but whose meta.json is malformed is not
        # skipped for an older one as if damaged in transit; read_meta refuses it, naming the field, when it is loaded.
        meta = read_json(os.path.join(path, "meta.json"))
        if not all(isinstance(meta.get(key), dict) for key in ("model_config", "train_config", "data")):
            return "meta.json lacks model_config, train_config or data"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    return None


def find_checkpoint(out_dir: str, which: str = "latest", log=print) -> str:
    """The newest (which="latest") or lowest-val-loss (which="best") verified checkpoint in out_dir, or the
    checkpoint directory given itself. Corrupt ones are reported through `log` and skipped."""
    if os.path.exists(os.path.join(out_dir, "COMPLETE")):
        candidates = [out_dir]
    else:
        candidates = list_checkpoints(out_dir)[::-1]
        if which == "best":
            candidates.sort(key=lambda p: _val_loss(p))
        elif which != "latest":
            raise UserError(f"unknown checkpoint choice {which!r}; use latest or best")
    if not candidates:
        near = _runs_beside(out_dir)
        hint = f" (runs with checkpoints beside it: {', '.join(near)})" if near else ""
        raise UserError(f"no checkpoint in {out_dir or repr(out_dir)}: train one first, or set --out_dir{hint}")
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if not os.path.exists(os.path.join(path, "COMPLETE")):  # pruned while we read it (COMPLETE goes first):
            return find_checkpoint(out_dir, which, log)  # not corrupt, gone; a newer one is there: list again
        log(f"warning: skipping corrupt checkpoint {path}: {problem}")
    raise UserError(f"every checkpoint in {out_dir} is corrupt; nothing to load")


def _runs_beside(out_dir: str, limit: int = 5) -> list[str]:
    """Directories next to out_dir (in the same parent) that hold checkpoints: where the user may have meant."""
    parent = os.path.dirname(os.path.abspath(out_dir or "."))
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    found = [n for n in names if os.path.isdir(os.path.join(parent, n)) and list_checkpoints(os.path.join(parent, n))]
    return [os.path.relpath(os.path.join(parent, n)) for n in found[:limit]]


def _val_loss(path: str) -> float:
    try:
        loss = read_meta(path).get("val_loss")
    except (OSError, ValueError):
        return float("inf")
    return float("inf") if loss is None else loss


def model_config_from_meta(meta: dict, path: str, **overrides) -> GPTConfig:
    """The GPTConfig a checkpoint's meta.json describes, checked key by key: a key this code does not know (what a
    newer version's checkpoint holds) or a value of the wrong type is one line, not a crash in the model."""
    saved = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"{path}/meta.json has no model_config; it is not a checkpoint of this code")
    hints = typing.get_type_hints(GPTConfig)
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        names = ", ".join(label(key) for key in unknown[:5])  # keys from the file: short, on one line
        raise UserError(
            f"{path} was written by a newer version of this code (model_config has {names}); update the code to load it"
        )
    check(ModelConfig, saved, f"{path}/meta.json: model_config")  # types and ranges; GPTConfig checks how they combine
    try:
        values = {key: coerce(value, hints[key], key) for key, value in saved.items()}
        return GPTConfig(**(values | overrides))
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"{path}/meta.json: model_config: {e}") from None


def save_lora_base(out_dir: str, model) -> dict:
    """Write `model`'s weights, the frozen base of a LoRA run, once: to out_dir/lora-base-<sha256[:16]>/ (kept when
    it is already there). Returns what the run's checkpoints record to find and verify it."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = None
    try:
        tmp = fresh_dir(out_dir, f"{TEMPORARY}ckpt-lora-base-")  # debris if this process dies here
        file = os.path.join(tmp, "model.safetensors")
        save_safetensors(_unique(model.state_dict()), file)
        _fsync(file)
    except (OSError, RuntimeError, SafetensorError) as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(e, out_dir):
            raise
        raise UserError(f"disk full at {out_dir}: the LoRA base weights were not written; free space") from None
    sha = _sha256(file)
    name = f"lora-base-{sha[:16]}"
    if os.path.isfile(os.path.join(out_dir, name, "model.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, os.path.join(out_dir, name))
        _fsync(out_dir)
    return {"base": name, "base_sha256": sha}


def _check_lora(lora: dict, config: GPTConfig, params: dict, file: str) -> None:
    """What a LoRA entry (its types checked by engine/schemas.py LoraEntry) asks of the model it is added to: a rank
    no larger than the layers it adapts, chat rows inside the vocabulary, trainable parameters the model has."""
    if lora["rank"] > config.n_embd:
        raise UserError(f"{file}: lora.rank: {lora['rank']} is more than the layers it adapts (n_embd {config.n_embd})")
    rows = lora.get("new_rows_from")
    if rows is not None and rows >= config.vocab_size:
        raise UserError(f"{file}: lora.new_rows_from: {rows} is past the vocabulary of {config.vocab_size}")
    unknown = [name for name in lora.get("trainable", ()) if name not in params]
    if unknown:
        raise UserError(f"{file}: lora.trainable: {short(unknown[0])} is not a parameter of this model")


def load_model(path: str, dropout: float = 0.0, weights: str | None = "raw") -> tuple[GPT, dict]:
    """The one way to build a GPT from a verified checkpoint directory: (the model on the CPU with the checkpoint's
    weights, in train mode, with the given dropout; the checkpoint's meta.json). weights="ema": the run's moving
    average of its weights (train.py --ema_decay) instead of the raw ones; None: not the checkpoint's own (a
    sharded run reads its pieces of them itself; a LoRA model still gets its base)."""
    meta = read_meta(path)
    config = model_config_from_meta(meta, path, dropout=dropout)
    try:
        check_fits(config, "cpu")  # a meta.json with absurd sizes is refused before anything is allocated
    except UserError as e:
        raise UserError(f"{path}/meta.json: model_config: {e}") from None
    text = meta["data"].get("tokenizer_json")
    if text:  # decoding builds it: its structure is checked now, naming where it is (engine/tokenization.py)
        where = f"{path}/meta.json: data.tokenizer_json"
        check(TokenizerJson, parse_json(text, where), where)
    model = GPT(config)
    lora = meta.get("lora")
    if lora:  # a LoRA checkpoint holds what trained; the frozen base it sits on is saved once beside it
        _check_lora(lora, config, dict(model.named_parameters()), f"{path}/meta.json")
        base = os.path.join(os.path.dirname(path), lora["base"])  # a plain lora-base-<hash> name (LoraEntry)
        base_file = os.path.join(base, "model.safetensors")
        if not os.path.isfile(base_file) or _sha256(base_file) != lora["base_sha256"]:
            raise UserError(
                f"{path} is a LoRA checkpoint whose base {base} is missing or changed; restore that directory"
            )
        load_weights(base, model)
        targets, trainable = tuple(lora["targets"]), tuple(lora.get("trainable", ()))
        add_lora(model, lora["rank"], lora["alpha"], targets, trainable, lora.get("new_rows_from"))
        if weights is not None:
            load_weights(path, model, only=[n for n, p in model.named_parameters() if p.requires_grad])
    elif weights is not None:
        load_weights(path, model)
    if weights is None:
        return model, meta
    if weights == "ema":
        average = load_state(path).get("ema")
        if average is None:
            raise UserError(f"{path} holds no weight average: it was trained without --ema_decay; use --weights=raw")
        params = dict(model.named_parameters())
        for name, t in average.items():  # names and shapes first: nothing is copied from a mismatched average
            if name != UPDATES and (name not in params or t.shape != params[name].shape):
                raise UserError(f"{path}/state.pt: ema.{label(name)}: not a parameter of this model, or not its shape")
        with torch.no_grad():
            for name, t in average.items():
                if name != UPDATES:  # the average's update count, not a weight
                    params[name].copy_(t)
    elif weights != "raw":
        raise UserError(f"--weights={weights!r}: use raw or ema")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:  # training never writes one; a damaged or foreign file would sample NaN or crash in multinomial
        raise UserError(f"{path} holds non-finite weights (NaN or inf in {bad}); load an earlier checkpoint")
    return model, meta


def load_newest_model(out_dir: str, which: str = "latest", log=print, weights: str = "raw") -> tuple[str, GPT, dict]:
    """(path, model, meta) of the checkpoint find_checkpoint picks, for readers (sampling, evaluation, export)
    that may run while a training run prunes out_dir: a checkpoint deleted between being picked and being read
    (pruning removes COMPLETE first) sends the reader back to pick again, rather than failing."""
    for _ in range(10):
        path = find_checkpoint(out_dir, which, log=log)
        try:
            return path, *load_model(path, weights=weights)
        except UserError:
            if os.path.exists(os.path.join(path, "COMPLETE")):
                raise  # still there: the problem is the checkpoint itself
    raise UserError(f"the checkpoints in {out_dir} keep being deleted while loading; try again")


def load_weights(path: str, model, only: list[str] | None = None, sharded: bool = False) -> None:
    """Load model.safetensors of checkpoint `path` (a sharded checkpoint's weights, every rank's pieces put
    together) into `model` (built from the checkpoint's model config), or only the tensors named in `only` (a LoRA
    checkpoint's trained ones), which must all be there; sharded: into an FSDP model's shards (a collective). Names
    and shapes are compared first, from the file's header (or the shards' index), so a file with other tensors is
    refused without reading any of them."""
    file = os.path.join(path, "model.safetensors")
    try:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if only is not None:
            expected = {name: shape for name, shape in expected.items() if name in only}
        if is_sharded(path):  # (a sharded run's: its index names the whole shapes)
            shapes = shard_shapes(os.path.join(path, SHARDS))
            found = {keys[1]: shape for keys, (shape, _) in shapes.items() if keys[0] == "model" and len(keys) == 2}
        else:
            with safe_open(file, framework="pt") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        extra = sorted(set(found) - set(expected))
        wrong = sorted(n for n in found.keys() & expected.keys() if found[n] != expected[n])
        problems = [f"unexpected tensors {', '.join(extra[:3])}"] if extra else []
        problems += [f"{n} is {list(found[n])}, the model needs {list(expected[n])}" for n in wrong[:1]]
        if problems:
            raise UserError(f"cannot load the weights in {path}: {'; '.join(problems)}")
        weights = read_shards(os.path.join(path, SHARDS), "model") if is_sharded(path) else load_file(file)
        # A tied weight saved once (under any of its names) also fills the names it is tied to.
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            present = [n for n in names if n in weights]
            for name in names:
                if present and name not in weights and (only is None or name in only):
                    weights[name] = weights[present[0]]
        if only is not None:
            missing = sorted(set(only) - set(weights))
            if missing:
                raise UserError(f"cannot load the weights in {path}: {', '.join(missing[:3])} missing")
        if sharded:
            load_model_state(model, weights, sharded)
        else:
            model.load_state_dict(weights, strict=only is None)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # RuntimeError: shapes or keys differ
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise UserError(f"cannot load the weights in {path}: {detail}") from None


def load_state(path: str, device: str = "cpu", shards: bool = True) -> dict:
    """Optimizer/scaler/loop state; weights_only=True so the file can only hold data, never code. A sharded
    checkpoint's moments and average are read whole from its shards (shards=False: not; a sharded run loads its own
    pieces of them)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location=device, weights_only=True)
    except Exception as e:  # a refused pickle (UnpicklingError) or a damaged file: either way, not loadable
        raise UserError(f"cannot load {path}/state.pt safely ({type(e).__name__}); it is damaged or not ours") from None
    keys = ("optimizers", "scaler", "iter_num", "best_val_loss")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing or not isinstance(state["optimizers"], list):
        lacks = ", ".join(missing) or "a list of optimizer states"
        raise UserError(f"{path}/state.pt is not a training state of this code (it lacks {lacks})")
    if is_sharded(path) and shards:  # the optimizers' moments and the average, put together from every rank's pieces
        state |= fill_sharded_state(state, read_shards(os.path.join(path, SHARDS), "optimizers"))
        state |= {"ema": read_shards(os.path.join(path, SHARDS), "ema") or None} if "ema" in state else {}
    return check(TrainingState, state, f"{path}/state.pt")  # what each entry holds, before anything loads it


def fill_sharded_state(state: dict, moments: dict) -> dict:
    """A sharded checkpoint's state.pt entries with the optimizers' moments put back (`moments`: by optimizer
    index, as the shards hold them, sharded or whole)."""
    optimizers = [opt | {"state": moments.get(str(i), {})} for i, opt in enumerate(state["optimizers"])]
    return {"optimizers": optimizers}


def code_version() -> str | None:
    """The git commit of this code (with -dirty for local changes), recorded in every checkpoint."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prune_checkpoints(out_dir: str, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints (the newest always) and the best one by val loss. A
    checkpoint that is a symlink is never deleted: what it points to is not this run's to delete."""
    paths = list_checkpoints(out_dir)
    if not paths:
        return
    keep = set(paths[-max(keep_last, 1) :])
    best = min(paths, key=_val_loss)
    if _val_loss(best) < float("inf"):
        keep.add(best)
    for path in paths:
        if path not in keep and not os.path.islink(path):
            try:
                os.remove(
                    os.path.join(path, "COMPLETE")
                )  # unlisted first: a crash mid-delete leaves no half checkpoint
            except FileNotFoundError:
                continue  # someone else removed it first
            shutil.rmtree(path, ignore_errors=True)
