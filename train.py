"""Train a GPT: on a CPU, one GPU, or many GPUs and nodes with torchrun (DDP).

    python train.py config/train_shakespeare_char.py --batch_size=32        # one process
    python train.py config/train_shakespeare_char_cpu.py                    # a laptop CPU
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py  # 8 GPUs on one node
    python train.py --help                                                  # every option

Two nodes: run on each `torchrun --nnodes=2 --node_rank=<0|1> --nproc_per_node=8 --master_addr=<ip of node 0>
--master_port=29500 train.py config/train_gpt2.py`.

Options are TrainConfig's fields below, set by preset files and then --key=value, as in nanoGPT.
"""

import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import health
from engine.batch_warmup import BatchWarmup, done
from engine.checkpoint import (
    OutDirLock,
    checkpoint_name,
    code_version,
    find_checkpoint,
    list_checkpoints,
    load_model,
    load_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
    save_lora_base,
)
from engine.configurator import format_config, format_overrides, parse_config
from engine.data import Tokenizer, eval_key, first_targets, get_batch, load_data, target_count, train_key
from engine.ema import EMA
from engine.errors import EXIT_NONFINITE, UserError, run_cli
from engine.files import open_nofollow, write_file
from engine.fsdp import load_model_state, load_optimizer_state, model_state, optimizer_state, shard_model
from engine.hf_interop import from_pretrained
from engine.lora import add_lora, lora_params, merge_lora, parse_targets
from engine.loss_curve import BackgroundPlot
from engine.memory import check_fits
from engine.optim import SCHEDULES, build_optimizers, lr_at
from engine.runtime import (
    StopSignals,
    peak_flops,
    seed_everything,
    setup_runtime,
    teardown_runtime,
    trace_data_dependent_shapes,
)
from engine.tasks import TASKS, read_items, score
from model import GPT, GPTConfig

MFU_WARMUP_ITERS = 5  # iterations left out of MFU: compilation and allocator warm-up, as nanoGPT


@dataclass
class TrainConfig:
    # keys renamed since, still accepted under their old names (in presets and saved train_config.py files)
    RENAMED: ClassVar[dict[str, str]] = {"checkpoint_every": "recompute_every"}

    # I/O
    out_dir: str = "out"  # where checkpoints, metrics.jsonl and the resolved config go
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations, and at the end
    log_interval: int = 1  # print a training line every this many iterations
    eval_iters: int = 200  # batches per split for each evaluation
    eval_only: bool = False  # evaluate once and exit
    eval_task: str | None = None  # also score a multiple-choice benchmark: hellaswag or choice (see engine/tasks.py)
    eval_task_file: str | None = None  # its JSONL; none with hellaswag = the hub's validation split
    eval_task_interval: int | None = None  # score it every this many iterations (and at the end); none = eval_interval
    eval_task_items: int | None = None  # score only the first this many items (faster); none = all
    always_save_checkpoint: bool = True  # checkpoint at every evaluation, not only when val loss improves
    keep_last: int = 2  # checkpoints kept besides the best one (older ones are deleted; never the newest)
    init_from: str = "scratch"  # scratch, resume (from out_dir), gpt2*, a Hugging Face directory or another run's dir
    # wandb logging
    wandb_log: bool = False  # log to Weights & Biases (master rank only; WANDB_MODE=offline works)
    wandb_project: str = "owt"  # wandb project name
    wandb_run_name: str = "gpt2"  # wandb run name
    # data
    dataset: str = "openwebtext"  # dataset name: reads data_root/<dataset>/ written by prepare/<dataset>.py
    data_root: str = "data"  # directory holding prepared datasets
    gradient_accumulation_steps: int = 40  # micro-steps per optimizer step, in total over all processes
    batch_size: int = 12  # sequences per micro-step and process
    block_size: int = 1024  # tokens per sequence (context length)
    batch_warmup_tokens: int = 0  # grow the global batch to the full one over this many tokens (GPT-3); 0 = off
    batch_warmup_start: int | None = None  # global micro-steps of the first steps (and the increment); none = 1/process
    # model
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # embedding width
    dropout: float = 0.0  # dropout probability; 0 for pretraining, try 0.1+ for fine-tuning
    bias: bool = False  # bias in Linear and LayerNorm layers (GPT-2 had them)
    vocab_size: int | None = None  # model vocabulary; none = the dataset's (GPT-2 presets use 50304, a multiple of 64)
    pos_embedding: str = "learned"  # positions: learned (GPT-2), sinusoidal, rope, alibi or none
    rope_theta: float = 10000.0  # RoPE base frequency
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm
    norm_position: str = "pre"  # pre (GPT-2) or post (the original Transformer's Add & Norm)
    norm_eps: float = 1e-5  # epsilon of the norms
    mlp: str = "gelu_tanh"  # gelu_tanh (GPT-2), gelu, relu, relu2 or swiglu
    mlp_hidden: int | None = None  # MLP hidden size; none = 4 * n_embd (swiglu: 8/3 * n_embd rounded up to 64)
    n_kv_head: int | None = None  # key/value heads: none = n_head, 1 = multi-query, in between = grouped-query
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    tie_embeddings: bool = True  # the output layer shares the token embedding matrix (GPT-2)
    n_expert: int = 0  # Mixture of Experts: experts per MLP layer; 0 = a dense MLP
    n_expert_active: int = 2  # experts each token is routed to (top-k)
    moe_shared_expert: bool = False  # add one expert that every token uses
    moe_aux_loss_coef: float = 0.01  # weight of the MoE load-balancing loss in the training loss
    # optimizer
    optimizer: str = "adamw"  # adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_learning_rate: float | None = None  # Muon's peak learning rate; none = learning_rate (RMS-matched to AdamW)
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # total optimizer steps (of the full batch: warmup's smaller steps count by their share)
    weight_decay: float = 1e-1  # AdamW weight decay, on matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    # LoRA fine-tuning (Hu et al. 2021): train low-rank adapters of a frozen model
    lora_rank: int = 0  # the adapters' rank r; 0 = no LoRA, every weight trains
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: str = "attn,mlp"  # the blocks' Linear layers that get adapters: attn, mlp or both
    ema_decay: float = 0.0  # keep an exponential moving average of the weights, e.g. 0.999; 0 = off
    ema_warmup: bool = True  # warm the average's decay up: min(ema_decay, (1 + t) / (10 + t)) after t updates
    health_interval: int = 0  # log per-layer gradient norms, update ratios and activation RMS this often; 0 = off
    # learning rate schedule
    decay_lr: bool = True  # apply lr_schedule after warmup; False keeps learning_rate constant (nanoGPT)
    lr_schedule: str = "cosine"  # cosine, wsd (warmup-stable-decay) or constant
    decay_fraction: float = 0.2  # wsd: the share of lr_decay_iters spent decaying to min_lr
    warmup_iters: int = 2000  # linear warmup steps
    lr_decay_iters: int | None = None  # the decay ends here; none = max_iters (Chinchilla: decay over the whole run)
    min_lr: float = 6e-5  # floor of the schedule; ~= learning_rate / 10 per Chinchilla
    # system
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (native bf16: Ampere+ GPUs, AMX CPUs; else fp16 on CUDA, fp32), float32, bfloat16
    compile: bool = True  # torch.compile the model (PyTorch 2)
    gradient_checkpointing: bool = False  # recompute blocks in the backward pass: less memory, more compute
    recompute_every: int = 1  # with gradient_checkpointing: recompute every k-th block (1 = all)
    fsdp: bool = False  # under torchrun: shard model, gradients and optimizer state (FSDP2) instead of DDP
    fp8: bool = False  # FP8 matmuls in the Linear layers (torchao; NVIDIA GPUs with compute capability 8.9+)
    seed: int = 1337  # seeds init, data order and dropout; a run is a function of its config
    max_nonfinite_steps: int = 10  # stop (exit code 3) after this many non-finite steps in a row; 0 never stops
    # loss-spike rollback: a spike restores the newest good checkpoint, moves the data on and lowers the LR
    max_rollbacks: int = 3  # rollbacks before stopping with exit code 3; 0 turns rollback off
    spike_factor: float = 4.0  # a step is bad when its loss exceeds this times the median of the recent good ones
    spike_window: int = 50  # how many recent good steps' losses the median is taken over
    spike_patience: int = 3  # bad steps in a row (also non-finite ones) that make a spike
    spike_lr_scale: float = 0.5  # the learning rate is multiplied by this at each rollback
    peak_flops: float | None = None  # device peak FLOP/s for MFU; none = look the GPU up in engine/runtime.py's table

    def __post_init__(self):
        if self.eval_task is not None and self.eval_task not in TASKS:
            raise ValueError(f"eval_task must be one of {', '.join(TASKS)}, got {self.eval_task!r}")
        if self.eval_task_interval is not None and self.eval_task_interval < 1:
            raise ValueError(f"eval_task_interval must be >= 1, got {self.eval_task_interval}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        parse_targets(self.lora_targets)
        if self.health_interval < 0:
            raise ValueError(f"health_interval must be >= 0 (0 = off), got {self.health_interval}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.lora_rank and self.fsdp:
            raise ValueError("lora_rank with fsdp=True is not supported: LoRA's optimizer state is small, use DDP")
        if self.lora_rank and self.fp8:  # torchao would swap the adapters' layers for plain FP8 ones: no adapters
            raise ValueError("fp8=True with lora_rank is not supported: train the adapters in bf16 (drop --fp8)")
        positive = (
            "eval_interval",
            "log_interval",
            "eval_iters",
            "gradient_accumulation_steps",
            "batch_size",
            "block_size",
        )
        for name in (*positive, "spike_window", "spike_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rollbacks < 0 or self.spike_factor <= 1 or not 0 < self.spike_lr_scale <= 1:
            raise ValueError("max_rollbacks must be >= 0, spike_factor > 1 and spike_lr_scale in (0, 1]")
        if not self.dataset.strip():
            raise ValueError("dataset is empty; name a prepared dataset in data_root, e.g. --dataset=shakespeare_char")
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty; name the run's directory, e.g. --out_dir=out")
        for name in ("max_iters", "keep_last", "warmup_iters", "max_nonfinite_steps", "batch_warmup_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # every number in range: a negative grad_clip would turn training into gradient ascent
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("muon_learning_rate", "peak_flops"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number > 0 or none, got {getattr(self, name)}")
        start = self.batch_warmup_start
        if start is not None and not 1 <= start <= self.gradient_accumulation_steps:
            raise ValueError(f"batch_warmup_start must be in [1, gradient_accumulation_steps] or none, got {start}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError(f"lr_decay_iters must be >= 1 or none, got {self.lr_decay_iters}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.fsdp and self.optimizer == "muon":
            raise ValueError("optimizer=muon needs whole matrices; use it without fsdp")
        if not 0 < self.decay_fraction <= 1 or self.recompute_every < 1:
            raise ValueError("decay_fraction must be in (0, 1] and recompute_every >= 1")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        model_config(self, self.vocab_size or 1)  # checks the architecture switches now, not after loading data


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The GPTConfig named by the model fields of a TrainConfig (they share names). vocab_size is the dataset's when
    the config leaves it open: rounded up to a multiple of 64, whose matmuls run faster on GPUs (the extra ids never
    occur in the data, and sampling never picks them)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**(fields | {"vocab_size": cfg.vocab_size or -(-vocab_size // 64) * 64}))


def size_report(cfg: TrainConfig, model: GPT) -> str:
    """Two lines for the start-up: parameters, tokens and FLOPs per iteration, and the data budget against
    Chinchilla's 20 tokens per parameter (Hoffmann et al. 2022). tools/sizing.py has the whole picture before a run."""
    n = model.num_params(non_embedding=False)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_iter = model.flops_per_token(cfg.block_size) * tokens_per_iter
    planned = cfg.max_iters * tokens_per_iter
    return (
        f"sizing: {n:,} parameters, {tokens_per_iter:,} tokens/iter, {flops_per_iter:.3g} FLOPs/iter (6N + 12LCT)\n"
        f"sizing: {planned:,} tokens planned = {planned / n:.1f} per parameter (Chinchilla-optimal: 20)"
    )


def main(argv=None):
    # config and runtime: presets and --key=value, then device, dtype and the torchrun process group
    cfg = parse_config(TrainConfig, argv, usage=__doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.backend, training=True)
    check_process_count(cfg, rt)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # the preset's count is global
    micro_tokens = cfg.batch_size * cfg.block_size  # and each step's count of global micro-steps: batch warmup's
    warmup = BatchWarmup(
        cfg.gradient_accumulation_steps,
        cfg.batch_warmup_start or rt.world_size,
        cfg.batch_warmup_tokens,
        micro_tokens,
        cfg.max_iters,
    )
    print_settings(cfg, rt, tokens_per_iter, warmup)

    # data; out_dir belongs to this run alone until it ends; signals are polled once per step from here on
    data = load_data(os.path.join(cfg.data_root, cfg.dataset), cfg.block_size)
    task = load_task(cfg, data) if cfg.eval_task else None  # read and checked before anything in out_dir is touched
    if data.chat and cfg.init_from != "resume" and not cfg.eval_only:  # reads every mask; block_size is fixed by now
        check_chat_coverage(data, cfg.block_size, rt.print0)
    with hold_out_dir(cfg.out_dir, rt), StopSignals() as stop, out_of_memory_hint(cfg, rt):
        # the model: from scratch, resumed from out_dir or GPT-2 weights; raw_model is never wrapped, so checkpoints
        # hold plain parameter names
        seed_everything(cfg.seed)
        raw_model, resume_from = init_model(cfg, rt, data)
        lora = setup_lora(cfg, rt, raw_model, data, resume_from)  # None without LoRA
        raw_model.recompute_every = cfg.recompute_every if cfg.gradient_checkpointing else 0
        if cfg.fp8:
            enable_fp8(raw_model, rt)
        if cfg.fsdp:
            # in place: raw_model's parameters become shards. With compile, each block is compiled before it is
            # sharded (FSDP's hooks between blocks would otherwise break the graph and leave the forward eager).
            shard_model(raw_model, rt.device_type, rt.world_size, rt.dtype, cfg.compile)
        betas = (cfg.beta1, cfg.beta2)
        optimizers = build_optimizers(
            raw_model, cfg.optimizer, cfg.weight_decay, cfg.learning_rate, betas, rt.device_type, cfg.muon_learning_rate
        )
        scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)  # float16 needs loss scaling
        ema = EMA(raw_model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None  # the weights, averaged
        state = LoopState() if resume_from is None else resume(resume_from, raw_model, optimizers, scaler, cfg, rt, ema)

        model, eval_model = wrap(raw_model, cfg, rt)  # compiled, then DDP; evaluation uses the compiled one
        log = RunLog(cfg, rt, state.iter_num + warmup.steps_left(state.tokens, state.progress), resume_from is None)
        peak = peak_flops(rt, cfg.peak_flops)
        flops_per_micro_step = raw_model.flops_per_token(cfg.block_size) * micro_tokens / rt.world_size  # per GPU
        timer = StepTimer(warmup=min(MFU_WARMUP_ITERS, cfg.max_iters // 10))
        bad_in_a_row, good_steps, exit_code = 0, 0, 0
        x, y = first_batch(cfg, rt, data, state, warmup)
        good, start = resume_from, None  # where a loss spike rolls back to: the newest checkpoint, else the start
        if cfg.max_rollbacks and not good:
            start = Snapshot.take(raw_model, optimizers, scaler, ema, state, cfg.fsdp)  # held in memory

        while True:
            # set the learning rate: every parameter group follows the schedule from its own base rate
            lr = scheduled_lr(cfg, state.progress)  # full batches' worth of steps: iter_num, but for batch warmup
            set_lr(optimizers, state.lr_scale * (lr / cfg.learning_rate if cfg.learning_rate else 0.0))

            # evaluate and checkpoint: every eval_interval and at the end; save when val improves (or always)
            last = done(state.progress, cfg.max_iters)
            if state.iter_num % cfg.eval_interval == 0 or last or cfg.eval_only:
                losses = estimate_loss(eval_model, data, cfg, rt)
                log(eval_record(state.iter_num, losses, eval_model, raw_model, ema, data, cfg, rt))
                improved = losses["val"] is not None and losses["val"] < state.best_val_loss  # None: no targets
                state.best_val_loss = losses["val"] if improved else state.best_val_loss
                wanted = (improved or cfg.always_save_checkpoint or last) and state.iter_num > 0 and not cfg.eval_only
                # resumed or rolled back to this very state: it is on disk already (under FSDP a save would gather it)
                if wanted and good != os.path.join(cfg.out_dir, checkpoint_name(state.iter_num, state.rollbacks)):
                    good = save(cfg, rt, raw_model, optimizers, scaler, state, data, losses, lora, ema) or good
                timer.restart()  # the step's time leaves out evaluation and checkpointing
            if task and (state.iter_num % (cfg.eval_task_interval or cfg.eval_interval) == 0 or last or cfg.eval_only):
                log(score_task(eval_model, task, cfg, rt, state.iter_num))  # a benchmark's accuracy
                timer.restart()
            if cfg.eval_only or last:
                break

            # micro-steps: this rank's share of the step's global micro-steps (all of gradient_accumulation_steps,
            # fewer during batch warmup), the next batch fetched while the GPU works. Dropout is reseeded from (seed,
            # rank, iteration), so a resumed run draws the masks an uninterrupted one draws
            if raw_model.config.dropout > 0:
                after_rollback = (state.rollbacks,) if state.rollbacks else ()  # then other masks, as other windows
                seed_everything(hash_seed(cfg.seed, rt.rank, state.iter_num, *after_rollback))
            loss_sum = torch.zeros((), device=rt.device)
            aux_sum = torch.zeros((), device=rt.device)  # MoE load-balancing loss, logged on its own
            micro_steps, tokens_after, progress_after = warmup.advance(state.tokens, state.progress)
            accum_steps = micro_steps // rt.world_size  # this rank's: global micro-steps rank * accum_steps onwards
            targets = global_targets(cfg, data, state, micro_steps) if data.chat else None
            chat_scale = rt.world_size / max(1, targets) if data.chat else None
            empty = targets == 0  # a chat batch without one assistant token: nothing to learn, no step, no loss
            for micro_step in range(accum_steps):
                sync = micro_step == accum_steps - 1 or not rt.ddp  # gradients cross ranks on the last one only
                if cfg.fsdp:
                    raw_model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or cfg.fsdp else model.no_sync():
                    with rt.autocast():
                        loss = micro_step_loss(model, x, y, accum_steps, chat_scale)
                    x, y = next_batch(
                        cfg, rt, data, state, warmup, micro_step, accum_steps, (tokens_after, progress_after)
                    )
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                if raw_model.config.n_expert:
                    aux_sum += raw_model.moe_aux_loss().detach() / accum_steps

            # clip and step: the norm of the all-reduced gradient is the same on every rank, so all agree on a skip
            grad_norm = unscale_and_clip(model, optimizers, scaler, cfg.grad_clip)
            checkup = (rt.master or cfg.fsdp) and cfg.health_interval and state.iter_num % cfg.health_interval == 0
            grads_before = health.before_step(raw_model, cfg.fsdp) if checkup else None  # telemetry, on its steps
            logging = state.iter_num % cfg.log_interval == 0
            if (logging or cfg.max_rollbacks) and rt.ddp:  # the mean over the global batch, the same on every rank
                dist.all_reduce(loss_sum)
                loss_sum /= rt.world_size
            # the step's one host sync: the norm decides the step, the losses go to the log
            grad_normf, lossf, auxf = torch.stack([grad_norm.float(), loss_sum.float(), aux_sum.float()]).tolist()
            finite = math.isfinite(grad_normf)
            state.clipped_steps += int(finite and cfg.grad_clip > 0 and grad_normf > cfg.grad_clip)
            if (finite or scaler.is_enabled()) and not empty:  # float16: the scaler skips a non-finite step itself
                for opt in optimizers:
                    scaler.step(opt)
                if ema:
                    ema.update(raw_model)
            scaler.update()  # (a no-op unless float16 scales the loss)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if checkup:
                log(health_record(raw_model, grads_before, x, state, rt, cfg.fsdp))
            good_steps, bad_in_a_row = (good_steps + 1, 0) if finite else (good_steps, bad_in_a_row + 1)
            if not finite:  # a skipped step, by us or by the scaler: counted either way, so a run of NaN weights stops
                state.skipped_steps += 1
                rt.print0(f"iter {state.iter_num}: non-finite gradient norm, step skipped ({bad_in_a_row} in a row)")

            # log: one record makes the console line, the metrics.jsonl row and the wandb point
            dt = timer.lap(share=micro_steps / cfg.gradient_accumulation_steps)
            state.iter_num, state.tokens, state.progress = state.iter_num + 1, tokens_after, progress_after
            if logging:
                record = {
                    "iter": state.iter_num - 1,
                    "loss": None if empty else lossf,
                    "lr": lr * state.lr_scale,
                    "dt": dt,
                }
                record |= {"tokens_per_sec": micro_steps * micro_tokens / dt, "grad_norm": grad_normf}
                record |= {"skipped_steps": state.skipped_steps, "eta_s": timer.eta(cfg.max_iters - state.progress)}
                record |= {"tokens": state.tokens}  # the token counter: every token trained so far
                record |= {"batch_tokens": micro_steps * micro_tokens} if warmup.tokens else {}
                if peak and timer.steps > MFU_WARMUP_ITERS:
                    record["mfu"] = flops_per_micro_step * micro_steps / dt / peak  # per GPU
                log(record | ({"aux_loss": auxf} if raw_model.config.n_expert else {}))  # this rank's MoE aux loss

            # roll back: spike_patience bad steps in a row (a loss spike, or non-finite) restore the newest good state
            if cfg.max_rollbacks and not empty and spiked(state, cfg, lossf, finite):
                if state.rollbacks >= cfg.max_rollbacks:
                    rt.print0(f"stopping: a loss spike after {state.rollbacks} rollbacks; the last good one: {good}")
                    exit_code = EXIT_NONFINITE
                    break
                state, record = roll_back(cfg, rt, raw_model, optimizers, scaler, ema, state, good, start, lossf)
                log(record)
                if good:  # the rolled-back state is saved at once (ckpt-<iter>-r<n>): a crash resumes it, not the spike
                    losses = checkpoint_losses(good) if rt.master else None  # its weights: its evaluation's losses
                    good = save(cfg, rt, raw_model, optimizers, scaler, state, data, losses, lora, ema) or good
                x, y = first_batch(cfg, rt, data, state, warmup)
                continue

            # stop: after too many non-finite steps in a row, or on a signal (after a checkpoint)
            if bad_in_a_row >= cfg.max_nonfinite_steps > 0:
                rt.print0(nonfinite_stop(cfg, rt, state.iter_num, bad_in_a_row, good_steps, math.isfinite(lossf)))
                exit_code = EXIT_NONFINITE
                break
            exit_code = stop.exit_code(rt)
            if exit_code:
                rt.print0(f"signal received: saving iteration {state.iter_num}; continue with --init_from=resume")
                save(cfg, rt, raw_model, optimizers, scaler, state, data, None, lora, ema)
                break

        log.close()
        # Free the DDP wrapper first: its reducer holds the process group, whose last release must happen inside
        # destroy_process_group (the GIL released), not when main() returns (a deadlock with gloo's worker threads).
        del model, eval_model
    teardown_runtime(rt)
    return exit_code


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


def wrap(raw_model: GPT, cfg: TrainConfig, rt) -> tuple:
    """(the model to train, the model to evaluate): torch.compile'd unless off (under FSDP its blocks already are),
    then DDP under torchrun (not FSDP: the model is sharded in place). Evaluation needs no gradient sync: no DDP."""
    model = raw_model
    if cfg.compile:  # before the first compiled forward, under FSDP too (its blocks are compiled, not yet traced)
        trace_data_dependent_shapes()
    if cfg.compile and not cfg.fsdp:
        rt.print0("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if rt.ddp and not cfg.fsdp:
        return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None), model
    return model, model


def check_process_count(cfg: TrainConfig, rt) -> None:
    """gradient_accumulation_steps is global: it must split evenly over the processes, and so must every step of
    batch warmup."""
    for name in ("gradient_accumulation_steps", "batch_warmup_start"):
        value = getattr(cfg, name)
        if value is not None and value % rt.world_size != 0:
            teardown_runtime(rt)  # every rank stops here, together
            raise UserError(f"{name}={value} is not divisible by the {rt.world_size} processes; make it a multiple")


def print_settings(cfg: TrainConfig, rt, tokens_per_iter: int, warmup: BatchWarmup) -> None:
    """What this run changes from the defaults (as nanoGPT prints its overrides), and where it runs."""
    rt.print0(f"# config: the defaults, with these changes (all of it goes to {cfg.out_dir}/train_config.py)")
    rt.print0(format_overrides(cfg))
    inherited = [k for k in ("dataset", "gradient_accumulation_steps") if k not in getattr(cfg, "given", ())]
    if inherited:  # the defaults are GPT-2's OpenWebText recipe: rarely what a preset of one's own means
        rt.print0(
            f"note: {' and '.join(f'{k}={getattr(cfg, k)!r}' for k in inherited)} "
            f"{'are defaults' if len(inherited) > 1 else 'is the default'} (GPT-2 on OpenWebText); set "
            f"{'them' if len(inherited) > 1 else 'it'} in the preset or on the command line if you meant otherwise"
        )
    rt.print0(
        f"# {rt.world_size} process(es) on {rt.device}, {str(rt.dtype).removeprefix('torch.')}; "
        f"tokens per iteration: {tokens_per_iter:,}"
    )
    if warmup.tokens and not cfg.eval_only:
        steps = warmup.steps_left(0, 0.0)
        rt.print0(
            f"# batch warmup: from {warmup.start * warmup.micro_tokens:,} to {tokens_per_iter:,} tokens per iteration "
            f"over the first {warmup.tokens:,} tokens; {steps:,} iterations for max_iters={cfg.max_iters} full ones"
        )
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if decay_iters > cfg.max_iters > 0 and cfg.decay_lr and cfg.lr_schedule != "constant" and not cfg.eval_only:
        rt.print0(
            f"note: lr_decay_iters={decay_iters} is past max_iters={cfg.max_iters}: this run ends before the "
            f"{cfg.lr_schedule} schedule has decayed (continue with --init_from=resume --max_iters={decay_iters}, "
            "or leave lr_decay_iters out to decay by max_iters)"
        )


@contextlib.contextmanager
def hold_out_dir(out_dir: str, rt):
    """Hold out_dir's lock for the run. The master takes it; under torchrun every rank learns whether it could, so a
    refused run stops on every rank with the same one line instead of leaving the others waiting in a collective."""
    lock, problem = None, None
    if rt.master:
        try:
            lock = OutDirLock(out_dir)
        except UserError as e:
            problem = str(e)
    if rt.ddp:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        teardown_runtime(rt)  # every rank is here: leave the process group together, not from gloo's threads at exit
        raise UserError(problem)
    try:
        yield
    finally:
        if lock:
            lock.release()


@contextlib.contextmanager
def out_of_memory_hint(cfg: TrainConfig, rt):
    """Running out of device memory is a one-line error saying which settings to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # the CPU allocator reports running out as a plain RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise UserError(
            f"out of memory on {rt.device} with batch_size={cfg.batch_size}, block_size="
            f"{cfg.block_size}; lower --batch_size (raise --gradient_accumulation_steps to keep the "
            "tokens per step) or --block_size"
        ) from None


def init_model(cfg: TrainConfig, rt, data) -> tuple[GPT, str | None]:
    """The model on rt.device: from scratch, from out_dir's checkpoint (init_from=resume; its path is returned too),
    or GPT-2 / Hugging Face weights. Refuses, before allocating, a model that cannot fit."""
    resume_from = None
    shards = rt.world_size if cfg.fsdp else 1  # FSDP divides weights, gradients and optimizer state over the ranks
    if cfg.init_from != "resume" and list_checkpoints(cfg.out_dir):  # a new run's rows and checkpoints would
        raise UserError(  # join that run's (eval_only too: a random model's row)
            f"{cfg.out_dir} already holds checkpoints; {'evaluate' if cfg.eval_only else 'continue'} them with "
            "--init_from=resume or choose another --out_dir"
        )
    if cfg.init_from == "scratch":
        config = model_config(cfg, data.meta["vocab_size"])
        check_fits(config, rt.device, cfg.batch_size, shards, cfg.gradient_checkpointing)  # before allocating
        model = GPT(config)
    elif cfg.init_from == "resume":
        resume_from = find_checkpoint(cfg.out_dir, log=rt.print0)
        check_resumable(read_meta(resume_from), cfg, data, log=rt.print0)
        model, _ = load_model(resume_from, cfg.dropout)
        rt.print0(f"resuming from {resume_from}")
    else:
        if os.path.isdir(cfg.init_from) and list_checkpoints(cfg.init_from):  # another run's weights, a fresh start
            path = find_checkpoint(cfg.init_from, log=rt.print0)
            model, meta = load_model(path, cfg.dropout)
            if meta.get("lora"):  # that run's model is its base with the adapters: folded in, a plain GPT again
                merge_lora(model)
            model.requires_grad_(True)  # this run trains what its own flags say (setup_lora freezes for LoRA)
            base = {k: meta.get("data", {}).get(k) for k in ("tokenizer", "tokenizer_hash")}
            if base != {k: data.meta.get(k) for k in base}:
                raise UserError(
                    f"{path} was trained with the {base['tokenizer']} tokenizer of another vocabulary than "
                    f"{cfg.dataset}'s ({data.meta['tokenizer']}); prepare the data with the same tokenizer"
                )
            rt.print0(f"starting from the weights of {path}")
        else:
            model = from_pretrained(cfg.init_from, {"dropout": cfg.dropout})
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
    if data.chat and model.config.vocab_size < data.meta["vocab_size"]:  # room for the chat template's tokens
        old = model.config.vocab_size
        model.grow_vocab(-(-data.meta["vocab_size"] // 64) * 64)
        rt.print0(f"vocabulary grown from {old} to {model.config.vocab_size} for the chat tokens")
    trainable = None  # LoRA trains its adapters (and on chat data the embedding) alone: far less optimizer state
    if cfg.lora_rank and cfg.init_from != "resume":
        trainable = lora_params(model, cfg.lora_rank, parse_targets(cfg.lora_targets))
        new_rows = model.config.vocab_size - chat_tokens_from(data) if data.chat else 0  # the chat tokens' rows
        trainable += new_rows * model.config.n_embd * (1 if model.config.tie_embeddings else 2)
    check_fits(model.config, rt.device, cfg.batch_size, shards, cfg.gradient_checkpointing, trainable)
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise UserError(
            f"the model's vocab_size {model.config.vocab_size} is smaller than the dataset's {data.meta['vocab_size']}"
        )
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's {model.config.block_size}")
    model.to(rt.device)
    rt.print0(f"model: {model.num_params() / 1e6:.2f}M parameters")
    rt.print0(size_report(cfg, model))
    return model, resume_from


def resume(path: str, raw_model: GPT, optimizers: list, scaler, cfg: TrainConfig, rt, ema, trim=True) -> LoopState:
    """Load a checkpoint's optimizer moments, loss scale and weight average into this run's (their hyperparameters
    stay this run's config) and return where its loop stood."""
    saved = load_state(path, rt.device)
    if ema:
        if "ema" not in saved:
            raise UserError(f"{path} was trained without --ema_decay: resume without it, or start a new run")
        try:
            ema.load_state_dict(saved["ema"])
        except (KeyError, RuntimeError) as e:  # names or shapes of another model: a damaged or foreign state.pt
            raise UserError(f"{path}/state.pt: ema: {str(e).splitlines()[0][:200]}; it is not this model's") from None
    for opt, opt_state in zip(optimizers, saved["optimizers"], strict=True):
        try:
            load_optimizer_state(raw_model, opt, opt_state, cfg.fsdp)
        except (KeyError, ValueError, RuntimeError) as e:  # e.g. a Muon run saved when MoE routers were in Muon
            raise UserError(
                f"cannot resume {path}: its {type(opt).__name__} state does not fit this optimizer "
                f"({type(e).__name__}: {str(e)[:200]}); start a new run from its weights instead"
            ) from None
    if saved["scaler"] and scaler.is_enabled():  # empty when the checkpoint was not trained in float16
        scaler.load_state_dict(saved["scaler"])
    if rt.master and trim:  # (a rollback keeps the rows: they show what happened)
        trim_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), saved["iter_num"], saved.get("rollbacks", 0))
    loop = {f.name: saved[f.name] for f in dataclasses.fields(LoopState) if f.name in saved}
    if "tokens" not in loop:  # saved before the token counter: every step was a full batch of the saved config
        run = read_meta(path)["train_config"]
        loop["tokens"] = saved["iter_num"] * run["gradient_accumulation_steps"] * run["batch_size"] * run["block_size"]
        loop["progress"] = float(saved["iter_num"])
    return LoopState(**loop)  # older checkpoints lack the other newer fields: their defaults


def checkpoint_losses(path: str) -> dict:
    """The losses a checkpoint's evaluation measured (none for one saved on a signal)."""
    meta = read_meta(path)
    return {"train": meta.get("train_loss"), "val": meta.get("val_loss")}


def save(cfg: TrainConfig, rt, raw_model: GPT, optimizers: list, scaler, state: LoopState, data, losses, lora, ema):
    """Checkpoint the run (losses: the evaluation's, or None; lora: setup_lora's record, or None; ema: the weight
    average, or None, kept in state.pt). Called on every rank: under FSDP gathering the full state is a collective.
    Only the master writes, and only finite weights: a diverged run keeps its last good one. A LoRA checkpoint holds
    only what trains (the base is saved once)."""
    path = os.path.join(cfg.out_dir, checkpoint_name(state.iter_num, state.rollbacks))  # every rank returns it
    if not (rt.master or cfg.fsdp):  # DDP ranks hold the master's weights: the same finiteness
        return path if all(torch.isfinite(p).all() for p in raw_model.parameters()) else None
    weights = model_state(raw_model, cfg.fsdp)
    if lora:
        trained = {n for n, p in raw_model.named_parameters() if p.requires_grad}
        weights = {n: w for n, w in weights.items() if n in trained}
    optimizer_states = [optimizer_state(raw_model, opt, cfg.fsdp) for opt in optimizers]
    average = ema.state_dict() if ema else None  # a collective too, under FSDP
    finite = all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    if cfg.fsdp:  # only the master holds the gathered weights: it decides for every rank
        decision = [bool(finite)]
        dist.broadcast_object_list(decision, src=0)
        finite = decision[0]
    if not rt.master:
        return path if finite else None
    if not finite:
        rt.print0(f"not saving iteration {state.iter_num}: the weights are not finite")
        return None
    loop_state = {"optimizers": optimizer_states, "scaler": scaler.state_dict()} | dataclasses.asdict(state)
    loop_state |= {"ema": average} if ema else {}
    meta = {
        "model_config": dataclasses.asdict(raw_model.config),
        "train_config": dataclasses.asdict(cfg),
        "data": data.fingerprint(),
        "code_version": code_version(),
        "val_loss": losses["val"] if losses else None,
        "train_loss": losses["train"] if losses else None,
        "rollbacks": state.rollbacks,
    } | ({"lora": lora} if lora else {})
    path = save_checkpoint(cfg.out_dir, state.iter_num, weights, loop_state, meta, state.rollbacks)
    prune_checkpoints(cfg.out_dir, cfg.keep_last)
    rt.print0(f"saved checkpoint {path}")
    return path


def chat_tokens_from(data) -> int:
    """The first id of a chat dataset's template tokens: they follow the tokenizer's own vocabulary."""
    return min(data.chat["special"].values())


def setup_lora(cfg: TrainConfig, rt, model: GPT, data, resume_from: str | None) -> dict | None:
    """With lora_rank: freeze the model and add adapters (a resumed LoRA checkpoint comes with them), and return what
    every checkpoint of the run records about them. The frozen base is written once, by the master, to
    out_dir/lora-base-<its sha256>/, which the checkpoints name. On chat data the chat tokens' rows of the token
    embedding (and of an untied lm_head) train too: they are new to the base model."""
    if resume_from is not None:
        return read_meta(resume_from).get("lora")
    if not cfg.lora_rank:
        return None
    new_rows_from = chat_tokens_from(data) if data.chat else None
    lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": list(parse_targets(cfg.lora_targets))}
    lora |= {"trainable": [], "new_rows_from": new_rows_from, "base_from": cfg.init_from}
    if rt.master:
        lora |= save_lora_base(cfg.out_dir, model)
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(lora["targets"]), new_rows_from=new_rows_from)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = f" (the embedding rows of the chat tokens, ids {new_rows_from} on, included)" if data.chat else ""
    rt.print0(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n:,} trainable parameters{embedding}")
    return lora


@dataclass
class Snapshot:
    """The run's starting state, in memory (weights on the CPU; under FSDP gathered on rank 0, which gives every
    rank its shards back): where a loss spike before the first checkpoint rolls back to."""

    weights: dict
    optimizers: list
    scaler: dict
    ema: dict | None
    state: LoopState
    sharded: bool  # taken from an FSDP model

    @staticmethod
    def take(model: GPT, optimizers: list, scaler, ema, state: LoopState, sharded: bool) -> "Snapshot":
        if sharded:  # collectives, on every rank
            weights = model_state(model, sharded)
        else:
            weights = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
        # a fresh optimizer's state is empty (and asking FSDP for it would make it: a zero step, counted)
        opts = [copy.deepcopy(optimizer_state(model, opt, sharded)) if opt.state else None for opt in optimizers]
        average = ema.state_dict() if ema else None
        return Snapshot(weights, opts, scaler.state_dict(), average, copy.deepcopy(state), sharded)

    def restore(self, model: GPT, optimizers: list, scaler, ema) -> LoopState:
        load_model_state(model, self.weights, self.sharded, from_rank0=self.sharded)
        for opt, saved in zip(optimizers, self.optimizers, strict=True):
            if saved is None:
                opt.state.clear()  # fresh again: the first step makes its moments
            else:
                load_optimizer_state(model, opt, copy.deepcopy(saved), self.sharded, from_rank0=self.sharded)
        scaler.load_state_dict(self.scaler)
        if ema:
            ema.load_state_dict(self.ema)
        return copy.deepcopy(self.state)


def spiked(state: LoopState, cfg: TrainConfig, loss: float, finite: bool) -> bool:
    """Whether this step ends a loss spike: spike_patience bad steps in a row, a bad step being one whose loss is not
    finite (or whose gradient norm is not), or above spike_factor times the median of the last spike_window good
    steps' losses. Good losses join the window; bad ones do not, so a divergence cannot become its own reference."""
    reference = statistics.median(state.recent_losses) if state.recent_losses else math.inf
    if finite and math.isfinite(loss) and loss <= cfg.spike_factor * reference:
        state.recent_losses = (state.recent_losses + [loss])[-cfg.spike_window :]
        state.bad_steps = 0
        return False
    state.bad_steps += 1
    return state.bad_steps >= cfg.spike_patience


def roll_back(cfg, rt, raw_model, optimizers, scaler, ema, state: LoopState, good, start, loss) -> tuple:
    """Restore the newest good state (the checkpoint `good`, else the `start` snapshot): weights, optimizer, scaler
    and average. The restored loop goes on with one more rollback (so other data windows) and the learning rate
    scaled by spike_lr_scale once more. Returns (the new loop state, its log record)."""
    if good:
        trained = [n for n, p in raw_model.named_parameters() if p.requires_grad]
        load_weights(good, raw_model, only=trained if cfg.lora_rank else None, sharded=cfg.fsdp)
        restored = resume(good, raw_model, optimizers, scaler, cfg, rt, ema, trim=False)
    else:
        restored = start.restore(raw_model, optimizers, scaler, ema)
    restored.rollbacks, restored.lr_scale = state.rollbacks + 1, state.lr_scale * cfg.spike_lr_scale
    restored.skipped_steps, restored.recent_losses, restored.bad_steps = state.skipped_steps, [], 0
    record = {"iter": state.iter_num - 1, "rollback": restored.rollbacks, "of": cfg.max_rollbacks, "spike_loss": loss}
    record |= {"to": good or "the start of this run", "to_iter": restored.iter_num, "lr_scale": restored.lr_scale}
    return restored, record


def train_batch(cfg: TrainConfig, rt, data, it: int, g: int, rollbacks: int = 0):
    """The batch of global micro-step g of iteration it (each rank runs a contiguous share of them). The windows
    depend only on (seed, iteration, global micro-step, rollbacks so far): exact on resume, disjoint across ranks."""
    return get_batch(data, "train", cfg.batch_size, cfg.block_size, train_key(cfg.seed, it, g, rollbacks), rt.device)


def first_batch(cfg: TrainConfig, rt, data, state: "LoopState", warmup: BatchWarmup):
    """This rank's first batch of the step at `state`: global micro-step rank * (its micro-steps per rank)."""
    per_rank = warmup.micro_steps(state.tokens, state.progress) // rt.world_size
    return train_batch(cfg, rt, data, state.iter_num, rt.rank * per_rank, state.rollbacks)


def next_batch(cfg, rt, data, state: LoopState, warmup: BatchWarmup, micro_step: int, accum_steps: int, after):
    """The batch after this rank's micro_step of accum_steps: its next micro-step's, or after the last one the next
    iteration's first (whose micro-step count follows `after`: the tokens and progress once this step is done)."""
    if micro_step + 1 < accum_steps:
        g = rt.rank * accum_steps + micro_step + 1  # the global micro-step
        return train_batch(cfg, rt, data, state.iter_num, g, state.rollbacks)
    upcoming = dataclasses.replace(state, iter_num=state.iter_num + 1, tokens=after[0], progress=after[1])
    return first_batch(cfg, rt, data, upcoming, warmup)


def scheduled_lr(cfg: TrainConfig, it: float) -> float:
    """The learning rate at iteration it (full batches' worth), from the config's schedule (lr_decay_iters defaults
    to max_iters)."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    return lr_at(
        it,
        learning_rate=cfg.learning_rate,
        warmup_iters=cfg.warmup_iters,
        lr_decay_iters=decay_iters,
        min_lr=cfg.min_lr,
        decay_lr=cfg.decay_lr,
        schedule=cfg.lr_schedule,
        decay_fraction=cfg.decay_fraction,
    )


def micro_step_loss(model, x, y, accum_steps: int, chat_scale: float | None) -> torch.Tensor:
    """One micro-step's share of the batch loss: summed over the micro-steps (and averaged over ranks by DDP) it is
    the mean over the global batch's targets. Plain text: each micro-batch's mean / accum_steps. Chat data, whose
    micro-batches hold different numbers of assistant tokens: the summed cross-entropy times chat_scale (world size
    over the global batch's target count). The logits are not kept: they would stay alive into the next step."""
    if chat_scale is None:
        return model(x, y)[1] / accum_steps
    return model(x, y, reduction="sum")[1] * chat_scale


def global_targets(cfg: TrainConfig, data, state: LoopState, micro_steps: int) -> int:
    """The targets the loss counts in this iteration's global batch, over every rank and micro-step."""
    keys = [train_key(cfg.seed, state.iter_num, g, state.rollbacks) for g in range(micro_steps)]
    return sum(target_count(data, "train", cfg.batch_size, cfg.block_size, key) for key in keys)


def check_chat_coverage(data, block_size: int, log) -> None:
    """A chat row learns only from assistant tokens within its first block_size: refuse a train split where no
    conversation has one, and say so when most have none (their batches train nothing) or the val split has none
    (its evaluations have no loss)."""
    for split in ("train", "val"):
        first = first_targets(data, split)
        share = float(np.mean(first <= block_size))
        if split == "train" and share == 0:
            raise UserError(
                f"no conversation of {data.data_dir}'s train split has an assistant token within block_size="
                f"{block_size} (the nearest is {first.min():,} tokens in); raise --block_size"
            )
        if share < 0.5:
            log(
                f"note: only {share:.0%} of the {split} split's conversations have an assistant token within "
                f"block_size={block_size}; the rest teach nothing{' and evaluate to no loss' if split == 'val' else ''}"
                f" (raise --block_size to {int(np.quantile(first, 0.5)):,} for half of them)"
            )


def health_record(raw_model: GPT, grads_before: tuple, x, state: LoopState, rt, sharded: bool) -> dict:
    """The per-layer telemetry of this step (engine/health.py) as a log record."""
    norms, weights = grads_before
    probed = health.probe(raw_model, x, rt.autocast)  # act_rms, attn_entropy and for MoE expert_load
    ratios = health.update_ratios(raw_model, weights, sharded)
    record = {"iter": state.iter_num, "grad_norm": norms, "update_ratio": ratios}
    return record | probed | {"clipped_steps": state.clipped_steps}


def eval_record(it: int, losses: dict, eval_model, raw_model: GPT, ema, data, cfg: TrainConfig, rt) -> dict:
    """The log record of an evaluation: the losses, and with EMA on the same batches' losses of the average."""
    record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
    if ema:
        with ema.swapped_in(raw_model):
            averaged = estimate_loss(eval_model, data, cfg, rt)
        record |= {"train_loss_ema": averaged["train"], "val_loss_ema": averaged["val"]}
    return record


def load_task(cfg: TrainConfig, data) -> tuple:
    """(items, encode, eot_id) of the eval_task, encoded with the dataset's tokenizer."""
    tokenizer = Tokenizer(data.meta)
    return read_items(cfg.eval_task, cfg.eval_task_file, cfg.eval_task_items), tokenizer.encode, tokenizer.eot_id


def score_task(model, task: tuple, cfg: TrainConfig, rt, it: int) -> dict:
    """The eval_task's accuracies as a log record. Every rank scores every item (the same forward passes on each,
    which FSDP's all-gathers need), so all agree without a collective."""
    items, encode, eot_id = task
    model.eval()
    result, _ = score(model, items, encode, eot_id, cfg.batch_size, rt.autocast)
    model.train()
    name = cfg.eval_task
    return {"iter": it, f"{name}_acc": result["acc"], f"{name}_acc_norm": result["acc_norm"], "task_items": len(items)}


def set_lr(optimizers: list, scale: float) -> None:
    """Every parameter group's learning rate: its own base rate times the schedule's scale."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale


def unscale_and_clip(model, optimizers: list, scaler, grad_clip: float) -> torch.Tensor:
    """Undo float16 loss scaling (a no-op otherwise), clip the global gradient norm to grad_clip (0: no clipping)
    and return the norm before clipping."""
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a distributed tensor


@dataclass
class StepTimer:
    """Wall time per step. Steps after the first `warmup` (compilation, allocator warm-up) give the mean step time
    the ETA extrapolates."""

    warmup: int
    t0: float = dataclasses.field(default_factory=time.time)
    steps: int = 0  # steps this process has run
    timed: float = 0.0  # seconds of the steps after warm-up
    timed_steps: float = 0.0  # full batches' worth

    def restart(self) -> None:
        self.t0 = time.time()

    def lap(self, share: float = 1.0) -> float:
        """The seconds since the last lap (or restart), counted as one step of `share` full batches."""
        t1 = time.time()
        dt, self.t0 = t1 - self.t0, t1
        self.steps += 1
        if self.steps > self.warmup:
            self.timed, self.timed_steps = self.timed + dt, self.timed_steps + share
        return dt

    def eta(self, steps_left: float) -> float | None:
        """Seconds for steps_left full batches at the mean pace so far."""
        return steps_left * self.timed / self.timed_steps if self.timed_steps else None


class RunLog:
    """Where a record goes: the console (nanoGPT's `iter` and `step` lines), and on the master metrics.jsonl, wandb
    and the loss curve (redrawn after each evaluation, on another thread). One dict makes all of them."""

    WANDB_NAMES = {"loss": "train/loss_step", "train_loss": "train/loss", "val_loss": "val/loss"}  # nanoGPT's names

    def __init__(self, cfg: TrainConfig, rt, planned_iters: int, fresh: bool):
        self.rt, self.max_iters = rt, planned_iters  # max_iters, or more steps with batch warmup
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.plotter = BackgroundPlot(cfg.out_dir)
        self.metrics_lost = False  # a row could not be written (full disk): warned once
        self.wandb = None
        if rt.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            config = f"# resolved config of the last run in this directory\n{format_config(cfg)}\n"
            write_file(os.path.join(cfg.out_dir, "train_config.py"), config)
            if fresh:  # rows there are of a run that died before its first checkpoint: they are not this run's
                trim_metrics(self.metrics_path, 0)
        if cfg.wandb_log and rt.master:  # imported only when asked for, on the master only
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_log=True needs wandb: pip install wandb (or drop --wandb_log)") from None
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))
            self.wandb = wandb

    def __call__(self, record: dict) -> None:
        self.rt.print0(console_line(record, self.max_iters))
        if not self.rt.master:
            return
        try:
            log_metrics(self.metrics_path, record)
        except OSError as e:  # a full disk: the run goes on (its checkpoints say the same), said once
            if not self.metrics_lost:
                print(f"warning: cannot write {self.metrics_path} ({e.strerror}); training goes on", file=sys.stderr)
            self.metrics_lost = True
        if "val_loss" in record or "task_items" in record:
            self.plotter.refresh()  # out_dir/loss_curve.png
        if self.wandb:
            point = {self.WANDB_NAMES.get(k, k): v for k, v in record.items() if not isinstance(v, (list, type(None)))}
            for name in (k for k, v in record.items() if isinstance(v, list) and k in health.QUANTITIES):
                point |= {f"health/{name}/layer_{i}": v for i, v in enumerate(record[name])}  # grouped per layer
            self.wandb.log(point)

    def close(self) -> None:
        self.plotter.join()
        if self.wandb:
            self.wandb.finish()


def console_line(record: dict, max_iters: int) -> str:
    """nanoGPT's lines: `step N: train loss X, val loss Y` for an evaluation, and for a step
    `iter N/max (P%): loss X, time Y ms, T tok/s` with the ETA, MFU and MoE aux loss when known."""
    if "val_loss" in record:
        line = f"step {record['iter']}: train loss {loss_text(record['train_loss'])}, val loss "
        line += loss_text(record["val_loss"])
        if "val_loss_ema" in record:
            train_ema, val_ema = loss_text(record["train_loss_ema"]), loss_text(record["val_loss_ema"])
            line += f" (EMA weights: train loss {train_ema}, val loss {val_ema})"
        return line
    if "act_rms" in record:
        return health.summary(record)
    if "rollback" in record:
        return (
            f"iter {record['iter']}: loss spike (loss {record['spike_loss']:.4f}): rolled back to {record['to']} "
            f"(iteration {record['to_iter']}), learning rate x{record['lr_scale']:g}, new data windows "
            f"(rollback {record['rollback']} of at most {record['of']})"
        )
    if "task_items" in record:
        name = next(k for k in record if k.endswith("_acc")).removesuffix("_acc")
        acc, norm = record[f"{name}_acc"], record[f"{name}_acc_norm"]
        return f"step {record['iter']}: {name} acc {acc:.4f}, acc_norm {norm:.4f} ({record['task_items']:,} items)"
    it = record["iter"]
    line = (
        f"iter {it}/{max_iters} ({100 * it / max(1, max_iters):.0f}%): loss {loss_text(record['loss'])}, "
        f"time {record['dt'] * 1000:.2f}ms, {record['tokens_per_sec']:,.0f} tok/s"
    )
    if record.get("eta_s") is not None:
        line += f", eta {format_duration(record['eta_s'])}"
    if "mfu" in record:
        line += f", mfu {record['mfu'] * 100:.2f}%"
    if "aux_loss" in record:
        line += f", aux loss {record['aux_loss']:.4f}"
    return line


def loss_text(loss: float | None) -> str:
    """A loss to 4 decimals, or n/a for a batch or evaluation with no target to score (chat data)."""
    return "n/a (no assistant tokens)" if loss is None else f"{loss:.4f}"


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def nonfinite_stop(cfg: TrainConfig, rt, iter_num: int, in_a_row: int, good_steps: int, loss_finite: bool) -> str:
    """The line training stops with after max_nonfinite_steps non-finite steps in a row."""
    return (
        f"stopping: {in_a_row} non-finite steps in a row at iteration {iter_num}; "
        f"{nonfinite_advice(cfg, rt, good_steps, loss_finite)} The last good checkpoint is kept."
    )


def nonfinite_advice(cfg: TrainConfig, rt, good_steps: int, loss_finite: bool) -> str:
    """What most likely made every step non-finite, from what the run saw (not always the learning rate)."""
    if rt.dtype == torch.float16:
        return "float16 overflowed even with loss scaling: train in --dtype=bfloat16 (or float32)."
    if good_steps == 0:
        return (
            "not one step of this run was finite, so the data or the model (or the checkpoint it resumed) is the "
            "likely cause, not the schedule: check them with tools/evaluate.py."
        )
    if loss_finite:
        return (
            f"the loss is finite but its gradients overflow: set --grad_clip (now {cfg.grad_clip}) or lower "
            "--learning_rate."
        )
    return (
        f"the weights diverged (the loss is not finite either): lower --learning_rate (now {cfg.learning_rate:g}) or "
        "warm up longer."
    )


@torch.no_grad()
def estimate_loss(model, data, cfg: TrainConfig, rt) -> dict[str, float | None]:
    """Mean loss over the same eval_iters batches of each split at every evaluation, shared out across ranks."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros(2, device=rt.device)  # loss sum, batch count
        # every rank runs the same number of forward passes (FSDP's all-gathers need all of them); extras weigh 0
        for first in range(0, cfg.eval_iters, rt.world_size):
            k = first + rt.rank
            x, y = get_batch(
                data, split, cfg.batch_size, cfg.block_size, eval_key(cfg.seed, k % cfg.eval_iters), rt.device
            )
            weight = float(k < cfg.eval_iters)
            with rt.autocast():
                if data.chat:  # weighted by tokens: batches hold different numbers of assistant tokens
                    _, loss = model(x, y, reduction="sum")
                    count = (y >= 0).sum().float() * weight
                else:
                    _, loss = model(x, y)
                    count = torch.tensor(weight, device=rt.device)
            total += torch.stack([loss.float() * weight, count])
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item() if total[1] > 0 else None  # chat batches with no target: no loss
    model.train()
    return out


def check_resumable(meta: dict, cfg: TrainConfig, data, log=print) -> None:
    """Refuse to resume into a different model or data; schedule-only changes are fine."""
    saved_train = meta["train_config"]
    # Every architecture key must be as the run was started (dropout may change). The keys are compared with the
    # saved train config rather than the model, so a run initialised from GPT-2 weights resumes with its command.
    keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout"]
    differ = [f"{k} ({saved_train.get(k)} -> {getattr(cfg, k)})" for k in keys if saved_train.get(k) != getattr(cfg, k)]
    for key in ("optimizer", "lora_rank", "lora_targets"):  # the saved optimizer state would not fit
        if saved_train.get(key, TrainConfig.__dataclass_fields__[key].default) != getattr(cfg, key):
            differ.append(f"{key} ({saved_train.get(key)} -> {getattr(cfg, key)})")
    if saved_train.get("dataset") != cfg.dataset:
        differ.append(f"dataset ({saved_train.get('dataset')} -> {cfg.dataset})")
    if saved_train.get("ema_decay", 0.0) and not cfg.ema_decay:  # its weight average would be dropped
        differ.append(f"ema_decay ({saved_train['ema_decay']} -> 0: the checkpoint keeps a weight average)")
    for key in ("tokenizer", "tokenizer_hash", "vocab_size"):
        if meta["data"].get(key) != data.meta.get(key):
            differ.append(f"data {key} ({meta['data'].get(key)} -> {data.meta.get(key)})")
    if differ:
        raise UserError(f"cannot resume: the checkpoint differs in {', '.join(differ)}; restore those settings")
    changed = [
        k
        for k in (
            "max_iters",
            "learning_rate",
            "muon_learning_rate",
            "weight_decay",
            "eval_interval",
            "lr_decay_iters",
            "min_lr",
            "warmup_iters",
        )
        if saved_train.get(k) != getattr(cfg, k)
    ]
    if changed:
        diffs = ", ".join(f"{k} ({saved_train.get(k)} -> {getattr(cfg, k)})" for k in changed)
        log(f"note: resuming with changed {diffs}")


def enable_fp8(model, rt) -> None:
    """Swap the blocks' Linear layers for FP8 training ones (torchao's float8 recipe); master weights unchanged."""
    capable = rt.device_type == "cuda" and torch.cuda.get_device_capability(rt.device) >= (8, 9)
    if not capable:
        raise UserError(
            f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
            f"this run is on {rt.device}"
        )
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("--fp8 uses torchao's float8 training: pip install torchao") from None
    convert_to_float8_training(model, module_filter_fn=fp8_eligible)


def fp8_eligible(module: torch.nn.Module, name: str) -> bool:
    """Which Linear layers train in FP8: those in the blocks whose dimensions are multiples of 16 (FP8 matmuls need
    them), except MoE routers (their choice is kept in float32). lm_head and the embeddings stay in bf16, where FP8
    hurts accuracy most."""
    if not isinstance(module, torch.nn.Linear) or not name.startswith("transformer.h.") or name.endswith("router"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def hash_seed(*key: int) -> int:
    """A 63-bit seed mixed from integers, so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)


def log_metrics(path: str, record: dict) -> None:
    """Append one JSON line, whole or not at all: one write() of the line, cut back off again if it failed part-way
    (a full disk), so the file never holds a torn line that the next append would glue onto."""
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()})
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the run's metrics")
    try:
        size = os.fstat(fd).st_size
        data = (line + "\n").encode()
        try:
            if os.write(fd, data) != len(data):  # a short write: the disk filled up part-way
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _kept(line: str, iter_num: int, rollbacks: int) -> bool:
    """Whether trim_metrics keeps this row: before iter_num, or one of the first `rollbacks` rollbacks' rows. A line
    that is not a row of ours is dropped."""
    try:
        row = json.loads(line)
        return row.get("iter", -1) < iter_num or row.get("rollback") in range(1, rollbacks + 1)
    except (ValueError, AttributeError, TypeError):
        return False


def trim_metrics(path: str, iter_num: int, rollbacks: int = 0) -> None:
    """Drop the rows at or past iteration iter_num (logged by the run after the checkpoint it resumes from, which
    the resumed run logs again), so every iteration appears once; the rows of the `rollbacks` rollbacks the
    checkpoint's state already counts stay (they explain its learning rate and data windows)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _kept(line, iter_num, rollbacks)]
    if len(kept) != len(lines):
        write_file(path, "".join(kept), kept="the untrimmed file")


if __name__ == "__main__":
    run_cli(main)
