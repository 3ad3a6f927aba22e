"""Train a GPT: on a CPU, one GPU, or many GPUs and nodes with torchrun (DDP or FSDP).

    python train.py config/train_shakespeare_char.py --batch_size=32        # one process
    python train.py config/train_shakespeare_char_cpu.py                    # a laptop CPU
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py  # 8 GPUs on one node
    python train.py --help                                                  # every option

Two nodes: run on each `torchrun --nnodes=2 --node_rank=<0|1> --nproc_per_node=8 --master_addr=<ip of node 0>
--master_port=29500 train.py config/train_gpt2.py`.

Options are TrainConfig's fields below, set by preset files and then --key=value, as in nanoGPT. Read on in nanoGPT's
order: TrainConfig, main() (set-up, then the loop in commented paragraphs), init_model, estimate_loss. What a run
holds is engine/train_state.py's TrainState; bad steps and rollbacks are engine/rollback.py's.
"""

import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from engine import health
from engine.batch_schedule import Batches, BatchWarmup, batch_objective, check_process_count, done
from engine.checkpoint import checkpoint_name, find_checkpoint, is_sharded, list_checkpoints, load_model, read_meta
from engine.configurator import format_overrides, parse_config
from engine.data import chat_tokens_from, check_chat_coverage, eval_key, get_batch, load_data
from engine.ema import EMA
from engine.errors import EXIT_NONFINITE, UserError, run_cli
from engine.fp8 import enable_fp8
from engine.fsdp import shard_model
from engine.hf_interop import from_pretrained
from engine.lora import lora_params, merge_lora, parse_targets
from engine.masking import SPECIAL
from engine.memory import check_fits, out_of_memory_hint
from engine.optim import SCHEDULES, lr_at, set_lr, setup_training
from engine.out_dir_lock import hold_out_dir
from engine.rollback import ROLL_BACK, STOP, BadSteps
from engine.run_log import RunLog, StepTimer, size_report
from engine.runtime import StopSignals, hash_seed, peak_flops, seed_everything, setup_runtime, teardown_runtime, wrap
from engine.tasks import TASKS, load_task, task_record
from engine.train_state import TrainState, check_resumable, start_lora
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
    arch: str = "decoder"  # decoder (GPT), encoder (BERT: masked tokens, or labels) or encoder_decoder (T5: pairs)
    mlm_probability: float = 0.15  # encoder: the share of tokens masked and predicted (BERT's 15%)
    n_dec_layer: int | None = None  # encoder_decoder: the decoder's blocks; none = n_layer
    rel_buckets: int = 32  # pos_embedding=t5: relative-position buckets (T5's bias, one per bucket and head)
    rel_max_distance: int = 128  # pos_embedding=t5: distances from this on share the last bucket
    attn_scale: bool = True  # scale attention scores by 1/sqrt(head size); False as T5 (the scale is in its init)
    objective: str | None = None  # encoder_decoder: span_corruption (T5's) on token files; none = pairs data
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
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, with gloo for CPU tensors; gloo on CPU), nccl or gloo
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (native bf16: Ampere+ GPUs, AMX CPUs; else fp16 on CUDA, fp32), float32, bfloat16
    compile: bool = True  # torch.compile the model (PyTorch 2)
    gradient_checkpointing: bool = False  # recompute blocks in the backward pass: less memory, more compute
    recompute_every: int = 1  # with gradient_checkpointing: recompute every k-th block (1 = all)
    fsdp: bool = False  # under torchrun: shard model, gradients and optimizer state (FSDP2) instead of DDP
    zero_stage: int = 0  # ZeRO: 1 shards the optimizer state (DDP), 2 also gradients, 3 also weights (fsdp); 0 = off
    cpu_offload: bool = False  # fsdp: weights, gradients and optimizer step in CPU memory (FSDP2's CPUOffloadPolicy)
    hsdp: int = 0  # fsdp over nodes: shard within groups of this many processes (a node), replicate across; 0 = off
    async_save: bool = True  # fsdp: each rank writes its checkpoint shards in the background while training goes on
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

    def __post_init__(self):  # every value in range before anything runs: a negative grad_clip is gradient ascent
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size")
        for names, ok, what in (
            ((*positive, "block_size", "spike_window", "spike_patience", "recompute_every"), lambda v: v >= 1, ">= 1"),
            (("max_iters", "keep_last", "warmup_iters", "batch_warmup_tokens"), lambda v: v >= 0, ">= 0"),
            (
                ("max_nonfinite_steps", "max_rollbacks", "lora_rank", "health_interval", "hsdp"),
                lambda v: v >= 0,
                ">= 0 (0 = off)",
            ),
            (("learning_rate", "min_lr", "weight_decay", "grad_clip"), lambda v: 0 <= v < math.inf, "a number >= 0"),
            (("beta1", "beta2", "ema_decay"), lambda v: 0 <= v < 1, "in [0, 1)"),
            (("muon_learning_rate", "peak_flops"), lambda v: v is None or 0 < v < math.inf, "a number > 0 or none"),
            (("eval_task_interval", "lr_decay_iters"), lambda v: v is None or v >= 1, ">= 1 or none"),
            (("spike_factor",), lambda v: v > 1, "> 1"),
            (("spike_lr_scale", "decay_fraction"), lambda v: 0 < v <= 1, "in (0, 1]"),
            (("mlm_probability",), lambda v: 0 < v < 1, "in (0, 1)"),
            (("seed",), lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
            (("optimizer",), lambda v: v in ("adamw", "muon"), "adamw or muon"),
            (("zero_stage",), lambda v: v in (0, 1, 2, 3), "0 (off), 1, 2 or 3"),
            (("lr_schedule",), lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            (("eval_task",), lambda v: v is None or v in TASKS, f"one of {', '.join(TASKS)}"),
            (("objective",), lambda v: v in (None, "span_corruption"), "span_corruption or none"),
        ):
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        start = self.batch_warmup_start
        if start is not None and not 1 <= start <= self.gradient_accumulation_steps:
            raise ValueError(f"batch_warmup_start must be in [1, gradient_accumulation_steps] or none, got {start}")
        if not self.dataset.strip():
            raise ValueError("dataset is empty; name a prepared dataset in data_root, e.g. --dataset=shakespeare_char")
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty; name the run's directory, e.g. --out_dir=out")
        parse_targets(self.lora_targets)
        if self.lora_rank and self.fp8:  # torchao would swap the adapters' layers for plain FP8 ones: no adapters
            raise ValueError("fp8=True with lora_rank is not supported: train the adapters in bf16 (drop --fp8)")
        self.fsdp = self.fsdp or self.zero_stage >= 2  # ZeRO-2 and ZeRO-3 are FSDP2 (fsdp alone: 3); ZeRO-1 is DDP's
        if (self.cpu_offload or self.hsdp) and not self.fsdp or self.fsdp and self.zero_stage == 1:
            raise ValueError("cpu_offload and hsdp need fsdp=True (or zero_stage 2 or 3); zero_stage=1 is without fsdp")
        if self.arch != "decoder" and self.eval_task:
            raise ValueError(f"eval_task scores a decoder's next-token likelihoods; arch={self.arch} has none")
        if self.objective and self.arch != "encoder_decoder":
            raise ValueError("objective=span_corruption pretrains an encoder-decoder: add --arch=encoder_decoder")
        if self.arch == "encoder_decoder" and self.health_interval:
            raise ValueError("health_interval is not supported for arch=encoder_decoder yet")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        GPTConfig.from_options(dataclasses.asdict(self), 1, pad_id=0)  # the switches now rather than after the data


def main(argv=None):
    # config and runtime: presets and --key=value, then device, dtype and the torchrun process group
    cfg = parse_config(TrainConfig, argv, usage=__doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.backend, training=True)
    check_process_count(cfg.gradient_accumulation_steps, cfg.batch_warmup_start, rt, cfg.fsdp)
    micro_tokens = cfg.batch_size * cfg.block_size  # a step takes gradient_accumulation_steps global micro-steps
    start = cfg.batch_warmup_start or rt.world_size  # (fewer during batch warmup)
    warmup = BatchWarmup(cfg.gradient_accumulation_steps, start, cfg.batch_warmup_tokens, micro_tokens, cfg.max_iters)
    print_settings(cfg, rt, warmup)

    # data; out_dir belongs to this run alone until it ends; signals are polled once per step from here on
    data = load_data(os.path.join(cfg.data_root, cfg.dataset), cfg.block_size)
    task = load_task(cfg.eval_task, cfg.eval_task_file, cfg.eval_task_items, data.meta) if cfg.eval_task else None
    if data.chat and cfg.init_from != "resume" and not cfg.eval_only:  # reads every mask; block_size is fixed by now
        check_chat_coverage(data, cfg.block_size, rt.print0)
    objective = batch_objective(cfg.arch, data, cfg.mlm_probability, cfg.objective)  # a decoder's: None
    oom_hint = out_of_memory_hint(rt.device, cfg.batch_size, cfg.block_size)
    with hold_out_dir(cfg.out_dir, rt), StopSignals() as stop, oom_hint, contextlib.ExitStack() as closing:
        # what the run holds (engine/train_state.py): the model (never wrapped: checkpoints hold plain names; under
        # FSDP sharded in place), its optimizers, the float16 loss scaler, the average, the LoRA record, the counters
        seed_everything(cfg.seed)
        raw_model, resume_from = init_model(cfg, rt, data, objective)
        lora = setup_lora(cfg, rt, raw_model, data, resume_from)  # None without LoRA
        if cfg.fp8:
            enable_fp8(raw_model, rt.device)
        if cfg.fsdp:  # with compile, each block is compiled before it is sharded (FSDP's hooks would break the graph)
            shard_model(raw_model, rt, cfg.compile, cfg.zero_stage, cfg.cpu_offload, cfg.hsdp)
        recompute_every = cfg.recompute_every if cfg.gradient_checkpointing else 0
        adamw = (cfg.optimizer, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
        optimizers = setup_training(raw_model, *adamw, cfg.muon_learning_rate, recompute_every, cfg.zero_stage == 1)
        scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)  # float16 needs loss scaling
        ema = EMA(raw_model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None  # the weights, averaged
        run_meta = {"train_config": dataclasses.asdict(cfg), "data": data.fingerprint()}  # in every checkpoint
        run_meta |= (
            {"encoder": {"special": objective.special, "mlm_probability": cfg.mlm_probability}} if objective else {}
        )
        saving = (cfg.out_dir, cfg.keep_last, run_meta, cfg.async_save)  # where, how many, what beside, how
        state = closing.enter_context(TrainState(raw_model, optimizers, scaler, ema, lora, rt, cfg.fsdp, *saving))
        if resume_from:
            state.resume(resume_from)
        loop = state.loop  # iteration, tokens, best val loss, rollbacks...

        # the compiled (and DDP-wrapped) model, the run log, the batches, and the watch on bad steps
        model, eval_model = wrap(raw_model, cfg.compile, cfg.fsdp, rt)  # evaluation uses the compiled one
        planned = loop.iter_num + warmup.steps_left(loop.tokens, loop.progress)
        wandb_run = (cfg.wandb_project, cfg.wandb_run_name) if cfg.wandb_log else None
        log = closing.enter_context(RunLog(cfg.out_dir, rt, planned, dataclasses.asdict(cfg), resume_from, wandb_run))
        batches = Batches(data, cfg.batch_size, cfg.block_size, cfg.seed, warmup, rt, objective)
        spikes = (cfg.max_rollbacks, cfg.spike_factor, cfg.spike_window, cfg.spike_patience, cfg.spike_lr_scale)
        advice = (rt.dtype == torch.float16, cfg.grad_clip, cfg.learning_rate)  # why every step may be non-finite
        bad_steps = BadSteps(state, resume_from, cfg.max_nonfinite_steps, *spikes, *advice)  # rolls back to resume_from
        flops_per_micro_step = raw_model.flops_per_token(cfg.block_size) * micro_tokens / rt.world_size  # per GPU
        timer = StepTimer(min(MFU_WARMUP_ITERS, cfg.max_iters // 10), peak_flops(rt, cfg.peak_flops), MFU_WARMUP_ITERS)
        moe = raw_model.config.n_expert > 0
        x, y = batches.first(loop)
        exit_code = 0

        while True:
            # set the learning rate: every parameter group follows the schedule from its own base rate
            lr = scheduled_lr(cfg, loop.progress)  # full batches' worth of steps: iter_num, but for batch warmup
            set_lr(optimizers, loop.lr_scale * (lr / cfg.learning_rate if cfg.learning_rate else 0.0))

            # evaluate and checkpoint: every eval_interval and at the end; save when val improves (or always)
            last = done(loop.progress, cfg.max_iters)
            if loop.iter_num % cfg.eval_interval == 0 or last or cfg.eval_only:
                losses = estimate_loss(eval_model, data, cfg, rt, objective)
                log(eval_record(loop.iter_num, losses, eval_model, raw_model, ema, data, cfg, rt, objective))
                improved = losses["val"] is not None and losses["val"] < loop.best_val_loss  # None: no targets
                loop.best_val_loss = losses["val"] if improved else loop.best_val_loss
                if save_wanted(cfg, loop, improved or last, bad_steps.good):
                    bad_steps.good = state.save(losses) or bad_steps.good
                timer.restart()  # the step's time leaves out evaluation and checkpointing
            if task and (loop.iter_num % (cfg.eval_task_interval or cfg.eval_interval) == 0 or last or cfg.eval_only):
                log(task_record(eval_model, cfg.eval_task, task, cfg.batch_size, rt.autocast, loop.iter_num))
                timer.restart()
            if cfg.eval_only or last:
                break

            # micro-steps: this rank's share of the step's global micro-steps, the next batch fetched while the GPU
            # works. Dropout is reseeded from (seed, rank, iteration), so a resumed run draws the same masks
            if raw_model.config.dropout > 0:  # (after a rollback other masks, as other windows)
                seed_everything(
                    hash_seed(cfg.seed, rt.rank, loop.iter_num, *([loop.rollbacks] if loop.rollbacks else []))
                )
            micro_steps, tokens_after, progress_after = warmup.advance(loop.tokens, loop.progress)
            accum_steps = micro_steps // rt.world_size  # this rank's: global micro-steps rank * accum_steps onwards
            targets = batches.targets(loop, micro_steps)  # chat, masked tokens, labels: the loss's count; text: None
            loss_sum, aux_sum = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)  # aux: MoE's
            for micro_step in range(accum_steps):
                sync = micro_step == accum_steps - 1 or not rt.ddp  # gradients cross ranks on the last one only
                if cfg.fsdp:
                    raw_model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or cfg.fsdp else model.no_sync():
                    with rt.autocast():
                        loss = micro_step_loss(model, x, y, accum_steps, rt.world_size, targets)
                    x, y = batches.after(loop, micro_step, accum_steps, tokens_after, progress_after)
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                if moe:
                    aux_sum += raw_model.moe_aux_loss().detach() / accum_steps

            # clip and step: the norm of the all-reduced gradient is the same on every rank, so all agree on a skip
            grad_norm = state.clip_gradients(cfg.grad_clip)
            checkup = (rt.master or cfg.fsdp) and cfg.health_interval and loop.iter_num % cfg.health_interval == 0
            grads_before = health.before_step(raw_model, cfg.fsdp) if checkup else None  # telemetry, on its steps
            logging = loop.iter_num % cfg.log_interval == 0
            if (logging or cfg.max_rollbacks) and rt.ddp:  # the mean over the global batch, the same on every rank
                dist.all_reduce(loss_sum)
                loss_sum /= rt.world_size
            # the step's one host sync: the norm decides the step, the losses go to the log
            grad_normf, lossf, auxf = torch.stack([grad_norm.float(), loss_sum.float(), aux_sum.float()]).tolist()
            finite, empty = math.isfinite(grad_normf), targets == 0  # empty: a chat batch with nothing to learn
            loop.clipped_steps += int(finite and cfg.grad_clip > 0 and grad_normf > cfg.grad_clip)
            state.step(take=(finite or scaler.is_enabled()) and not empty)  # float16: the scaler skips a bad step
            if checkup:
                log(health.record(raw_model, grads_before, x, loop.iter_num, loop.clipped_steps, rt.autocast, cfg.fsdp))
            share, tokens = micro_steps / cfg.gradient_accumulation_steps, micro_steps * micro_tokens
            timing = timer.lap(share, tokens, flops_per_micro_step * micro_steps, cfg.max_iters - progress_after)
            loop.iter_num, loop.tokens, loop.progress = loop.iter_num + 1, tokens_after, progress_after
            verdict = bad_steps.judge(state, lossf, finite, empty)  # carry on, roll back or stop; counts skips

            # log: one record makes the console line, the metrics.jsonl row and the wandb point
            if logging:
                record = {"iter": loop.iter_num - 1, "loss": None if empty else lossf, "lr": lr * loop.lr_scale}
                record |= timing | {"grad_norm": grad_normf, "skipped_steps": loop.skipped_steps, "tokens": loop.tokens}
                record |= ({"batch_tokens": tokens} if warmup.tokens else {}) | ({"aux_loss": auxf} if moe else {})
                log(record)  # (aux_loss: this rank's MoE load-balancing loss)

            # a loss spike rolls back to the newest good state; too many bad steps stop the run (exit code 3); a
            # signal saves and stops it
            if verdict == ROLL_BACK:
                bad_steps.roll_back(state, lossf, log)  # (a checkpoint's state is saved again as ckpt-<iter>-r<n>)
                loop = state.loop
                x, y = batches.first(loop)
                continue
            if verdict == STOP:
                rt.print0(bad_steps.stop_line)
                exit_code = EXIT_NONFINITE
                break
            exit_code = stop.exit_code(rt)
            if exit_code:
                rt.print0(f"signal received: saving iteration {loop.iter_num}; continue with --init_from=resume")
                state.save(None)
                break

        # Free the DDP wrapper first: its reducer holds the process group, whose last release must happen inside
        # destroy_process_group (the GIL released), not when main() returns (a deadlock with gloo's worker threads).
        del model, eval_model
    teardown_runtime(rt)
    return exit_code


def init_model(cfg: TrainConfig, rt, data, objective=None) -> tuple[GPT, str | None]:
    """The model on rt.device, in one pass: pick the source (scratch, out_dir's checkpoint with init_from=resume,
    whose path is returned too, another run's weights, GPT-2 or a Hugging Face directory); build or load it; resize it
    for the chat tokens or a cropped block_size, or give it a classification head for the dataset's labels; check
    once that it fits; move it to the device."""
    if cfg.init_from != "resume" and list_checkpoints(cfg.out_dir):  # a new run's rows and checkpoints would
        raise UserError(  # join that run's (eval_only too: a random model's row)
            f"{cfg.out_dir} already holds checkpoints; {'evaluate' if cfg.eval_only else 'continue'} them with "
            "--init_from=resume or choose another --out_dir"
        )
    shards = (cfg.hsdp or rt.world_size) if cfg.fsdp else 1  # FSDP divides weights, gradients and AdamW state
    resume_from = find_checkpoint(cfg.out_dir, log=rt.print0) if cfg.init_from == "resume" else None
    other_run = cfg.init_from not in ("scratch", "resume") and os.path.isdir(cfg.init_from)
    other_run = find_checkpoint(cfg.init_from, log=rt.print0) if other_run and list_checkpoints(cfg.init_from) else None
    vocab = max(data.meta["vocab_size"], 1 + max(objective.special.values()) if objective else 0)  # with its specials
    labels = data.classify["labels"] if data.classify else None
    if cfg.init_from == "scratch":
        padded = labels or cfg.arch == "encoder_decoder"  # a classifier's [PAD], an encoder-decoder's <pad>
        pad = {"pad_id": objective.special.get("<pad>", objective.special.get("[PAD]"))} if padded else {}
        config = GPTConfig.from_options(dataclasses.asdict(cfg), vocab, **pad, n_labels=len(labels or ()))
        check_fits(config, rt.device, cfg.batch_size, shards, cfg.gradient_checkpointing)  # before allocating
        model = GPT(config)
    elif resume_from:
        check_resumable(read_meta(resume_from), dataclasses.asdict(cfg), data.meta, log=rt.print0)
        model, _ = load_model(resume_from, cfg.dropout, None if cfg.fsdp and is_sharded(resume_from) else "raw")
        rt.print0(f"resuming from {resume_from}")  # (FSDP from shards: each rank reads its own weights, TrainState)
    elif other_run:  # another run's weights, a fresh start
        model, meta = load_model(other_run, cfg.dropout)
        model.labels = (meta["data"].get("classify") or {}).get("labels")  # a classifier's
        if meta.get("lora"):  # that run's model is its base with the adapters: folded in, a plain GPT again
            merge_lora(model)
        model.requires_grad_(True)  # this run trains what its own flags say (setup_lora freezes for LoRA)
        base = {k: meta.get("data", {}).get(k) for k in ("tokenizer", "tokenizer_hash")}
        if base != {k: data.meta.get(k) for k in base}:
            raise UserError(
                f"{other_run} was trained with the {base['tokenizer']} tokenizer of another vocabulary than "
                f"{cfg.dataset}'s ({data.meta['tokenizer']}); prepare the data with the same tokenizer"
            )
        rt.print0(f"starting from the weights of {other_run}")
    else:
        model = from_pretrained(cfg.init_from, {"dropout": cfg.dropout})
    if model.config.arch != cfg.arch:
        raise UserError(f"{cfg.init_from} holds an {model.config.arch}: train it with --arch={model.config.arch}")
    if model.config.n_labels and not labels:
        raise UserError(f"{cfg.init_from} holds a classifier: fine-tune it on labelled texts (prepare/classify.py)")
    if labels and not resume_from and getattr(model, "labels", None) != labels:  # (an encoder's MLM head, or others)
        model.to_classifier(len(labels), objective.special["[PAD]"])
        rt.print0(f"a new classification head for the {len(labels)} labels of {cfg.dataset}")
    pad = objective.special.get("<pad>", objective.special.get("[PAD]")) if objective else None
    if model.config.pad_id not in (None, pad):  # another tokenizer's ids: the data was not prepared with it
        raise UserError(
            f"{cfg.init_from} pads with id {model.config.pad_id}, {cfg.dataset} with {pad}: prepare the data with the "
            "model's tokenizer"
        )
    if not resume_from and cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    if data.chat and model.config.vocab_size < data.meta["vocab_size"]:  # room for the chat template's tokens
        old = model.config.vocab_size
        model.grow_vocab(-(-data.meta["vocab_size"] // 64) * 64)
        rt.print0(f"vocabulary grown from {old} to {model.config.vocab_size} for the chat tokens")
    trainable = None  # LoRA trains its adapters (and on chat data the embedding) alone: far less optimizer state
    if cfg.lora_rank and not resume_from:
        trainable = lora_params(model, cfg.lora_rank, parse_targets(cfg.lora_targets))
        new_rows = model.config.vocab_size - chat_tokens_from(data) if data.chat else 0  # the chat tokens' rows
        trainable += new_rows * model.config.n_embd * (1 if model.config.tie_embeddings else 2)
        trainable += sum(p.numel() for p in model.classifier.parameters()) if labels else 0  # a new head trains
    check_fits(model.config, rt.device, cfg.batch_size, shards, cfg.gradient_checkpointing, trainable)
    if model.config.vocab_size < vocab:
        specials = f" and the encoder's {len(SPECIAL)} special tokens" if cfg.arch == "encoder" else ""
        raise UserError(
            f"the model's vocab_size {model.config.vocab_size} is smaller than the dataset's {data.meta['vocab_size']}"
            f"{specials}"
        )
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's {model.config.block_size}")
    model.to(rt.device)
    rt.print0(f"model: {model.num_params() / 1e6:.2f}M parameters")
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    rt.print0(size_report(model, tokens_per_iter, cfg.block_size, cfg.max_iters))
    return model, resume_from


@torch.no_grad()
def estimate_loss(model, data, cfg: TrainConfig, rt, objective=None) -> dict[str, float | None]:
    """Mean loss over the same eval_iters batches of each split at every evaluation, shared out across ranks. An
    encoder's (objective: its Masking or Labelled) is over the masked tokens (drawn from the batch number: the same at
    every evaluation) or the labels, with the share of them predicted right as "<split>_accuracy"."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros(3, device=rt.device)  # loss sum, batch (or target) count, right predictions
        # every rank runs the same number of forward passes (FSDP's all-gathers need all of them); extras weigh 0
        for first in range(0, cfg.eval_iters, rt.world_size):
            k = first + rt.rank
            key, weight = eval_key(cfg.seed, k % cfg.eval_iters), float(k < cfg.eval_iters)
            batch = objective.batch if objective else get_batch  # an encoder's: `[CLS] text [SEP]`, masked or labelled
            x, y = batch(data, split, cfg.batch_size, cfg.block_size, key, rt.device)
            with rt.autocast():
                if data.chat or objective:  # weighted by targets: batches hold different numbers of them
                    logits, loss = model(x, y, reduction="sum")
                    count = (y >= 0).sum().float() * weight
                else:
                    logits, loss = model(x, y)
                    count = torch.tensor(weight, device=rt.device)
            right = (
                ((logits.argmax(-1) == y) & (y >= 0)).sum().float() * weight if objective else torch.zeros_like(count)
            )
            total += torch.stack([loss.float() * weight, count, right])
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item() if total[1] > 0 else None  # chat batches with no target: no loss
        if objective:
            out[f"{split}_accuracy"] = (total[2] / total[1]).item() if total[1] > 0 else None
    model.train()
    return out


def print_settings(cfg: TrainConfig, rt, warmup: BatchWarmup) -> None:
    """What this run changes from the defaults (as nanoGPT prints its overrides), and where it runs."""
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # the preset's count is global
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


def eval_record(it: int, losses: dict, eval_model, raw_model: GPT, ema, data, cfg: TrainConfig, rt, objective) -> dict:
    """The log record of an evaluation: the losses (an encoder's also its accuracies: of masked tokens or labels),
    and with EMA on the same batches' losses of the average."""
    record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
    record |= {f"{split}_accuracy": losses[f"{split}_accuracy"] for split in ("train", "val") if objective}
    if ema:
        with ema.swapped_in(raw_model):
            averaged = estimate_loss(eval_model, data, cfg, rt, objective)
        record |= {"train_loss_ema": averaged["train"], "val_loss_ema": averaged["val"]}
    return record


def setup_lora(cfg: TrainConfig, rt, model: GPT, data, resume_from: str | None) -> dict | None:
    """The LoRA record every checkpoint keeps: a resumed LoRA checkpoint's (its model came with the adapters), or
    with lora_rank the model frozen and adapters added (engine/train_state.py start_lora); None without LoRA."""
    if resume_from:
        return read_meta(resume_from).get("lora")
    if not cfg.lora_rank:
        return None
    chat_rows = chat_tokens_from(data) if data.chat else None  # chat: these new rows of the embedding train too
    adapters = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, chat_rows)
    return start_lora(model, *adapters, cfg.init_from, cfg.out_dir, rt)


def save_wanted(cfg: TrainConfig, loop, better: bool, good: str | None) -> bool:
    """Whether an evaluation's state is saved: when val improved or the run ends (or always, always_save_checkpoint),
    past iteration 0, unless on disk already (resumed or rolled back to, good: it would be written again)."""
    here = os.path.join(cfg.out_dir, checkpoint_name(loop.iter_num, loop.rollbacks))
    return (better or cfg.always_save_checkpoint) and loop.iter_num > 0 and not cfg.eval_only and good != here


def micro_step_loss(model, x, y, accum_steps: int, world_size: int, targets: int | None) -> torch.Tensor:
    """One micro-step's share of the batch loss: summed over the micro-steps (and averaged over ranks by DDP) it is
    the mean over the global batch's targets. Plain text: each micro-batch's mean / accum_steps. Chat data, whose
    micro-batches hold different numbers of assistant tokens: the summed cross-entropy times world size over the
    global batch's target count; the same for an encoder's masked tokens. The logits are not kept: they would stay
    alive into the next step."""
    if targets is None:
        return model(x, y)[1] / accum_steps
    return model(x, y, reduction="sum")[1] * (world_size / max(1, targets))


def scheduled_lr(cfg: TrainConfig, it: float) -> float:
    """The learning rate at iteration it (full batches' worth), from the schedule (lr_decay_iters none: max_iters)."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    schedule = {"schedule": cfg.lr_schedule, "decay_fraction": cfg.decay_fraction, "decay_lr": cfg.decay_lr}
    return lr_at(it, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr, **schedule)


if __name__ == "__main__":
    run_cli(main)
