"""What a training run holds, in one object: the model, its optimizers, the loss scaler, the weight average (EMA),
the loop's counters and the LoRA record. Saving a checkpoint, resuming one and the rollback snapshot all go through
TrainState.state_dict() / load_state_dict(), so the state a rollback restores is the state a checkpoint holds, and a
stateful feature is one entry here (torchtitan's `Stateful` idea), not an argument through every function.

state_dict() is what a checkpoint holds: "model" (the weights, written to model.safetensors, or shards; with LoRA only
those that train, the frozen base being saved once), and the rest written to state.pt: "optimizers" (each keyed by
parameter name, engine/fsdp.py's format, the same in every mode; empty for one that has not stepped yet), "scaler",
"ema" (with --ema_decay) and the LoopState fields.
Under FSDP it is each rank's shards, gathered nowhere: every rank writes its own pieces of the weights, moments and
average to a sharded checkpoint (save_shards, in the background by default), and reads its own pieces back, on any
number of ranks; the rollback snapshot is each rank's copy of its pieces.
"""

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.checkpoint import (
    ShardedSave,
    checkpoint_name,
    code_version,
    fill_sharded_state,
    is_sharded,
    load_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
    save_lora_base,
)
from engine.errors import UserError
from engine.fsdp import is_zero, load_model_state, load_optimizer_state, model_state, not_stepped, optimizer_state
from engine.lora import add_lora, parse_targets
from engine.sharded_checkpoint import SHARDS, load_shards
from model import GPTConfig

# what checkpoints saved before these options existed ran with
BEFORE_KEYS = {"optimizer": "adamw", "lora_rank": 0, "lora_targets": "attn,mlp"}


@dataclass
class LoopState:
    """Where the loop is: what state.pt stores beside the optimizer and scaler states."""

    iter_num: int = 0
    tokens: int = 0  # tokens trained so far (global)
    progress: float = 0.0  # full batches' worth of steps: iter_num, less during batch warmup (the LR schedule's)
    best_val_loss: float = float("inf")
    skipped_steps: int = 0  # steps skipped for a non-finite gradient norm, over the whole run
    rollbacks: int = 0  # loss-spike rollbacks so far; each moves the data windows on
    lr_scale: float = 1.0  # the learning rate's factor: spike_lr_scale per rollback
    recent_losses: list[float] = dataclasses.field(default_factory=list)  # the spike detector's reference window
    bad_steps: int = 0  # bad steps in a row (a spike, or non-finite)
    clipped_steps: int = 0  # steps whose gradient norm was clipped


class TrainState:
    """The run's state. model is the raw model (never compiled or DDP-wrapped, so names stay plain; under FSDP its
    parameters are shards); lora is the record every checkpoint keeps about the adapters (None without LoRA); rt the
    runtime (rank, device, logging)."""

    def __init__(
        self,
        model,
        optimizers,
        scaler,
        ema,
        lora,
        rt,
        sharded,
        out_dir: str,
        keep_last: int,
        meta: dict,
        async_save=True,
    ):
        self.model, self.optimizers, self.scaler, self.ema, self.lora = model, optimizers, scaler, ema, lora
        self.rt, self.sharded = rt, sharded
        # where checkpoints go, how many are kept besides the best, and what each records beside the state (the
        # run's train config, the data's fingerprint); async_save=False: a sharded run's checkpoint is written
        # before training goes on
        self.out_dir, self.keep_last, self.meta, self.async_save = out_dir, keep_last, meta, async_save
        self.loop = LoopState()
        self.saving: ShardedSave | None = None  # a sharded checkpoint being written
        self.group = None  # the process group its writers talk over (gloo, apart from training's)

    def clip_gradients(self, grad_clip: float) -> torch.Tensor:
        """Undo float16 loss scaling (a no-op otherwise), clip the global gradient norm to grad_clip (0: no
        clipping) and return the norm before clipping (the same on every rank)."""
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip or float("inf"))
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor

    def step(self, take: bool) -> None:
        """The optimizer step (when take; under float16 the scaler skips a non-finite one itself), the weight
        average's update after it, and the gradients cleared for the next."""
        if take:
            for opt in self.optimizers:
                self.scaler.step(opt)
            if self.ema:
                self.ema.update(self.model)
        self.scaler.update()  # (a no-op unless float16 scales the loss)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def trained(self) -> list[str]:
        """The names of the parameters that train (with LoRA: the adapters, and on chat data the new rows)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self, template: bool = False, local: bool = False) -> dict:
        """Under FSDP each rank's shards (DTensors), gathered nowhere. template: every optimizer's state included,
        made first for one that has not stepped (a state to load a checkpoint's into). local: ZeRO-1's optimizer
        state as each rank holds it (the rollback snapshot's), not gathered on rank 0 (a checkpoint's)."""
        weights = model_state(self.model, self.sharded)
        if self.lora:
            trained = set(self.trained())
            weights = {n: w for n, w in weights.items() if n in trained}
        # an optimizer that has not stepped has no state to save (asking FSDP for it would make it: a step)
        optimizers = [  # (ZeRO-1: a collective whose state only rank 0 gets)
            optimizer_state(self.model, opt, self.sharded, local)
            if opt.state or template or is_zero(opt)
            else not_stepped()
            for opt in self.optimizers
        ]
        state = {"model": weights, "optimizers": optimizers, "scaler": self.scaler.state_dict()}
        state |= {"ema": self.ema.state_dict(sharded=self.sharded)} if self.ema else {}
        return state | dataclasses.asdict(self.loop)

    def load_state_dict(self, state: dict, source: str = "the snapshot") -> None:
        """Load what state_dict() gave (weights only when "model" is there: a resumed run built its model from the
        checkpoint; under FSDP shards, or whole tensors every rank holds). The optimizers' hyperparameters stay this
        run's; a state of another model is one line naming source."""
        if "model" in state:  # (with LoRA the trained weights alone)
            load_model_state(self.model, state["model"], self.sharded, strict=not self.lora)
        if self.ema:
            if "ema" not in state:
                raise UserError(f"{source} was trained without --ema_decay: resume without it, or start a new run")
            try:
                self.ema.load_state_dict(state["ema"])
            except (KeyError, RuntimeError) as e:  # names or shapes of another model: a damaged or foreign state.pt
                detail = str(e).splitlines()[0][:200]
                raise UserError(f"{source}/state.pt: ema: {detail}; it is not this model's") from None
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            try:
                load_optimizer_state(self.model, opt, saved, self.sharded)
            except (KeyError, ValueError, RuntimeError) as e:  # e.g. a Muon run saved when MoE routers were in Muon
                raise UserError(
                    f"cannot resume {source}: its {type(opt).__name__} state does not fit this optimizer "
                    f"({type(e).__name__}: {str(e)[:200]}); start a new run from its weights instead"
                ) from None
        if state["scaler"] and self.scaler.is_enabled():  # empty when not trained in float16
            self.scaler.load_state_dict(state["scaler"])
        fields = {f.name for f in dataclasses.fields(LoopState)}
        self.loop = LoopState(**copy.deepcopy({k: v for k, v in state.items() if k in fields}))

    def snapshot(self) -> dict:
        """state_dict(), copied and held in memory on the CPU: the run's starting state, where a loss spike before
        the first checkpoint rolls back to. Under FSDP each rank holds a copy of its own shards."""
        return _copied(self.state_dict(local=True))

    def restore(self, snapshot: dict) -> None:
        """Back to a snapshot (it stays as it was: restoring twice gives the same state twice)."""
        if self.sharded:  # each rank's pieces, copied into its shards
            state = self.state_dict(template=True)
            _copy_into(state, snapshot)
        else:
            state = _copied(snapshot)
        self.load_state_dict(state)

    def resume(self, path: str) -> None:
        """Load checkpoint `path`'s state.pt (its optimizer moments, loss scale, average and loop counters) into this
        state. The weights are the model's already (init_model built it from the checkpoint), except for a sharded
        run resuming a sharded checkpoint: every rank reads its own pieces of the weights too, nothing whole."""
        if self.sharded and is_sharded(path):
            saved = load_state(path, self.rt.device, shards=False)
            state = self.state_dict(template=True)
            stepped = [str(i) for i, opt in enumerate(saved["optimizers"]) if opt["param_groups"]]
            ema = state.get("ema", {}) if "ema" in saved else {}  # (one missing: load_state_dict's one line)
            tensors = {"model": state["model"], "optimizers": {}, "ema": ema}
            tensors["optimizers"] = {i: state["optimizers"][int(i)]["state"] for i in stepped}
            load_shards(os.path.join(path, SHARDS), tensors)
            saved |= fill_sharded_state(saved, tensors["optimizers"]) | {"model": tensors["model"]}
            saved |= {"ema": tensors["ema"]} if "ema" in saved else {}
        else:  # (ZeRO-1: on the CPU, every rank keeping only its part of the optimizer state)
            saved = load_state(path, "cpu" if any(is_zero(opt) for opt in self.optimizers) else self.rt.device)
        if "tokens" not in saved:  # saved before the token counter: every step was a full batch of its config
            run = read_meta(path)["train_config"]
            batch = run["gradient_accumulation_steps"] * run["batch_size"] * run["block_size"]
            saved |= {"tokens": saved["iter_num"] * batch, "progress": float(saved["iter_num"])}
        self.load_state_dict(saved, source=path)

    def roll_back_to(self, path: str) -> None:
        """Checkpoint `path` whole again: its weights (with LoRA the trained ones) and its state.pt."""
        self.finish_saving()  # (it may be the checkpoint still being written)
        if not (self.sharded and is_sharded(path)):
            load_weights(path, self.model, only=self.trained() if self.lora else None, sharded=self.sharded)
        self.resume(path)

    def checkpoint_meta(self, losses: dict | None) -> dict:
        """What meta.json records beside the state: model and train config, data, code version, losses."""
        meta = {"model_config": dataclasses.asdict(self.model.config)} | self.meta | {"code_version": code_version()}
        meta |= {"val_loss": losses["val"] if losses else None, "train_loss": losses["train"] if losses else None}
        return meta | {"rollbacks": self.loop.rollbacks} | ({"lora": self.lora} if self.lora else {})

    def save(self, losses: dict | None) -> str | None:
        """Checkpoint the run to out_dir/ckpt-<iter>[-r<rollbacks>] and prune to keep_last, and return its path (on
        every rank), or None when the weights are not finite: a diverged run keeps its last good checkpoint. losses:
        the evaluation's, or None. Called on every rank: under DDP only the master writes; under FSDP every rank
        writes its shards (save_shards)."""
        rt, loop = self.rt, self.loop
        self.finish_saving()
        if self.sharded:
            return self.save_shards(losses)
        path = os.path.join(self.out_dir, checkpoint_name(loop.iter_num, loop.rollbacks))
        zero = any(is_zero(opt) for opt in self.optimizers)  # ZeRO-1: every rank sends the master its optimizer state
        if not rt.master:  # DDP ranks hold the master's weights: the same finiteness
            if zero:
                self.state_dict()  # (its part of the optimizer state, gathered by the master)
            return path if all(torch.isfinite(p).all() for p in self.model.parameters()) else None
        state = self.state_dict()
        weights = state.pop("model")
        if not all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
            rt.print0(f"not saving iteration {loop.iter_num}: the weights are not finite")
            return None
        path = save_checkpoint(
            self.out_dir, loop.iter_num, weights, state, self.checkpoint_meta(losses), loop.rollbacks
        )
        prune_checkpoints(self.out_dir, self.keep_last)
        rt.print0(f"saved checkpoint {path}")
        return path

    def save_shards(self, losses: dict | None) -> str | None:
        """Under FSDP: every rank writes its own shards of the weights, moments and average (DCP), in the background
        unless async_save=False; rank 0 writes state.pt (the rest) and meta.json, and puts the checkpoint in place
        once every rank has written. Returns its path at once: finish_saving() waits for it."""
        rt, loop = self.rt, self.loop
        path = os.path.join(self.out_dir, checkpoint_name(loop.iter_num, loop.rollbacks))
        state = self.state_dict()
        finite = all(torch.isfinite(_local(w)).all() for w in state["model"].values() if w.is_floating_point())
        agreed = torch.tensor([float(finite)], device=rt.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every rank decides alike
        if not agreed.item():
            rt.print0(f"not saving iteration {loop.iter_num}: the weights are not finite")
            return None
        tensors = {"model": state.pop("model"), "ema": state.pop("ema", {})}
        tensors["optimizers"] = {str(i): opt["state"] for i, opt in enumerate(state["optimizers"])}
        state["optimizers"] = [opt | {"state": {}} for opt in state["optimizers"]]  # state.pt: their groups alone
        state |= {"ema": {}} if self.ema else {}
        if self.group is None:  # a gloo group of its own: the background writers never meet training's collectives
            self.group = dist.new_group(backend="gloo")
        meta = self.checkpoint_meta(losses) if rt.master else {}  # (rank 0 writes it)
        args = (self.out_dir, loop.iter_num, loop.rollbacks, tensors, state, meta, rt)
        self.saving = ShardedSave(*args, self.group, self.async_save, self.keep_last)
        if not self.async_save:
            self.finish_saving()
        return path

    def __enter__(self) -> "TrainState":
        return self

    def __exit__(self, *exc) -> None:
        """Leaving the run: a sharded checkpoint still being written is waited for."""
        self.finish_saving()

    def finish_saving(self) -> None:
        """Wait for the sharded checkpoint being written (if any) to be in place; raise what went wrong with it."""
        saving, self.saving = self.saving, None
        if saving:
            path = saving.wait()
            self.rt.print0(f"saved checkpoint {path}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's piece of a DTensor


def _copied(tree):
    """A copy of a (nested) state dict: tensors (this rank's pieces of DTensors) cloned to the CPU."""
    if isinstance(tree, dict):
        return {k: _copied(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copied(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return _local(tree).detach().to("cpu", copy=True)
    return copy.deepcopy(tree)


def _copy_into(state: dict, saved: dict) -> None:
    """Copy `saved` (a _copied snapshot) into `state` (state_dict(template=True)): tensors in place (into this rank's
    pieces), everything else by value."""
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            _copy_into(state[key], value)
        elif isinstance(value, list) and isinstance(state.get(key), list) and key == "optimizers":
            for own, theirs in zip(state[key], value, strict=True):
                _copy_into(own, theirs)
        elif isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
            with torch.no_grad():
                _local(state[key]).copy_(value)
        else:
            state[key] = copy.deepcopy(value)


def check_resumable(meta: dict, options: dict, data_meta: dict, log=print) -> None:
    """Refuse to resume checkpoint meta into a different model or data (options: the run's train.py options; data_meta:
    its dataset's meta.json); schedule-only changes are fine, and said."""
    saved_train = meta["train_config"]
    # Every architecture key must be as the run was started (dropout may change). The keys are compared with the
    # saved train config rather than the model, so a run initialised from GPT-2 weights resumes with its command.
    # A checkpoint saved before a switch existed ran with its default.
    keys = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name not in ("dropout", *GPTConfig.FROM_DATA)}
    differ = [f"{k} ({saved_train.get(k)} -> {options[k]})" for k in keys if saved_train.get(k, keys[k]) != options[k]]
    for key in ("optimizer", "lora_rank", "lora_targets"):  # the saved optimizer state would not fit
        if saved_train.get(key, BEFORE_KEYS[key]) != options[key]:
            differ.append(f"{key} ({saved_train.get(key)} -> {options[key]})")
    if saved_train.get("dataset") != options["dataset"]:
        differ.append(f"dataset ({saved_train.get('dataset')} -> {options['dataset']})")
    if saved_train.get("ema_decay", 0.0) and not options["ema_decay"]:  # its weight average would be dropped
        differ.append(f"ema_decay ({saved_train['ema_decay']} -> 0: the checkpoint keeps a weight average)")
    for key in ("tokenizer", "tokenizer_hash", "vocab_size", "classify"):  # (classify: a classifier's labels)
        if meta["data"].get(key) != data_meta.get(key):
            differ.append(f"data {key} ({meta['data'].get(key)} -> {data_meta.get(key)})")
    if differ:
        raise UserError(f"cannot resume: the checkpoint differs in {', '.join(differ)}; restore those settings")
    schedule = ("max_iters", "learning_rate", "muon_learning_rate", "weight_decay", "eval_interval", "lr_decay_iters")
    changed = [k for k in (*schedule, "min_lr", "warmup_iters") if saved_train.get(k) != options[k]]
    if changed:
        diffs = ", ".join(f"{k} ({saved_train.get(k)} -> {options[k]})" for k in changed)
        log(f"note: resuming with changed {diffs}")


def start_lora(
    model, rank: int, alpha: float, targets: str, new_rows_from: int | None, base_from: str, out_dir: str, rt
) -> dict:
    """Freeze the model and add rank-`rank` adapters to its `targets` layers, and return what
    every checkpoint of the run records about them. The frozen base is written once, by the master, to
    out_dir/lora-base-<its sha256>/, which the checkpoints name. On chat data the chat tokens' rows of the token
    embedding (and of an untied lm_head), ids new_rows_from on, train too: they are new to the base model; so does a
    classifier's head (as PEFT's modules_to_save)."""
    lora = {"rank": rank, "alpha": alpha, "targets": list(parse_targets(targets))}
    head = [name for name, _ in model.named_parameters() if name.startswith("classifier.")]
    lora |= {"trainable": head, "new_rows_from": new_rows_from, "base_from": base_from}
    if rt.master:
        lora |= save_lora_base(out_dir, model)
    add_lora(model, rank, alpha, tuple(lora["targets"]), tuple(head), new_rows_from=new_rows_from)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = (
        f" (the embedding rows of the chat tokens, ids {new_rows_from} on, included)"
        if new_rows_from is not None
        else ""
    )
    rt.print0(f"LoRA rank {rank} on {targets}: {n:,} trainable parameters{embedding}")
    return lora
