"""How big is a training run before you start it: parameters, FLOPs, memory, time and data, from a train config.

    python tools/sizing.py config/train_gpt2.py --gpu=A100 --num_gpus=8
    python tools/sizing.py config/train_shakespeare_char.py --gpu=H100
    python tools/sizing.py config/train_gpt2.py --n_layer=24 --n_head=16 --n_embd=1024 --gpu=H100 --num_gpus=8 --mfu=0.4

Takes train.py's command line (presets, then --key=value, resolved by train.py itself: engine/configurator.py
resolve_options) plus --gpu, --num_gpus and --mfu. The model is built on PyTorch's meta device, so nothing is
allocated and parameters are counted exactly.

Formulas (b micro-batch, s block_size, h n_embd, a n_head, L n_layer, V vocab, N parameters):
  FLOPs per token   6N + 12·L·h·s (PaLM, Chowdhery et al. 2022, appendix B; 6N counts active weights, so an MoE
                    counts its routed experts only); causal attention does half the attention work: 6N + 6·L·h·s.
  weights + grads + AdamW   4N + 4N + 8N bytes (float32 master weights, gradients, exp_avg and exp_avg_sq); with
                    LoRA 4N + 16A, A the adapters' parameters (Hu et al. 2021).
  activations per layer     34·s·b·h + 5·a·s²·b bytes for 16-bit activations (Korthikanti et al. 2022, "Reducing
                    Activation Recomputation in Large Transformer Models", section 4.1; a 4h GELU MLP, dropout masks
                    included). Flash attention (SDPA's kernels) never stores the s² terms: 34·s·b·h. Plus 6·s·b·V for
                    the 16-bit logits and the float32 log-probabilities the loss keeps.
  with gradient checkpointing  each layer keeps only its 16-bit input, 2·s·b·h, and one layer's activations exist
                    at a time while it is recomputed (Korthikanti et al. 2022, section 4).
  step time         FLOPs per iteration / (num_gpus · peak FLOP/s · MFU), peak from runtime.GPU_PEAK_FLOPS, or on
                    a CPU this machine's measured matmul rate in the dtype train.py would train in there; a CPU
                    run whose step takes seconds also has its step timed (train.py's step, eager, random tokens).
  Chinchilla        20 training tokens per parameter (Hoffmann et al. 2022, "Training Compute-Optimal Large
                    Language Models", table 3).
Memory figures are per GPU: DDP keeps a full copy of weights, gradients and optimizer state on each; --zero_stage=1
divides the optimizer state over the GPUs, 2 also the gradients (the weights gathered whole from forward to backward),
3 (--fsdp=True) also the weights (gathered one block at a time); --hsdp=N divides over each group of N GPUs only;
--cpu_offload=True moves the divided state to CPU memory (docs/distributed.md).
"""

import dataclasses
import json
import os
import sys
import time
import types
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import torch

from bench.train_speed import measure
from engine.configurator import PRINT_CONFIG, describe_fields, parse_config, resolve_options
from engine.data import dataset_vocab_size
from engine.errors import UserError, run_cli
from engine.lora import lora_params, parse_targets
from engine.masking import token_ids_needed
from engine.memory import activation_bytes, device_memory
from engine.runtime import GPU_PEAK_FLOPS, pick_dtype
from model import GPT, GPTConfig

TRAIN_PY = os.path.join(ROOT, "train.py")  # whose command line this takes
CHINCHILLA_TOKENS_PER_PARAM = 20
MEASURE_CPU_STEP_UP_TO_S = 4.0  # a CPU run's step is timed when its estimated step is at most this (5 are run)


@dataclass
class SizingOptions:
    gpu: str = "A100"  # GPU name in runtime.GPU_PEAK_FLOPS (H100, A100, RTX 4090, ...), or cpu (measured); a run
    # that would train on the CPU (device cpu, or auto without CUDA) is sized for the CPU unless --gpu says otherwise
    num_gpus: int = 1  # GPUs sharing each iteration (DDP)
    mfu: float = 0.45  # assumed model FLOPs utilisation; 40-50% is what well-tuned GPT training reaches


def build_meta_model(config: GPTConfig) -> GPT:
    """The model with every tensor on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return GPT(config)


def param_counts(model: GPT) -> dict[str, int]:
    """Parameters by part. named_parameters() lists a tied lm_head once, as the token embedding: lm_head is 0."""
    parts = dict.fromkeys(("embeddings", "position", "attention", "mlp", "norms", "lm_head"), 0)
    for name, p in model.named_parameters():
        if name.startswith("transformer.wte."):
            part = "embeddings"
        elif name.startswith(("transformer.wpe.", "decoder.wpe.", "transformer.rel_bias.", "decoder.rel_bias.")):
            part = "position"  # (learned tables; T5's bias buckets)
        elif ".attn." in name or ".cross." in name:  # c_attn, c_proj and the QK-norm weights; cross-attention's
            part = "attention"
        elif ".mlp." in name:  # a dense MLP, or an MoE's router, experts and shared expert
            part = "mlp"
        elif ".ln_" in name or name.startswith(("transformer.ln_f.", "transformer.ln_e.", "decoder.ln_f.")):
            part = "norms"
        elif name.startswith(("lm_head.", "mlm_head.", "classifier.")):  # an MLM head, a classifier's: heads too
            part = "lm_head"
        else:
            raise ValueError(f"parameter {name} belongs to no part; teach param_counts about it")
        parts[part] += p.numel()
    return parts


def gpu_peak_flops(gpu: str, cpu_dtype: torch.dtype = torch.float32) -> float:
    """Peak dense 16-bit FLOP/s of a GPU named as in the table (case, spaces, dashes and underscores aside: RTX 4090,
    rtx4090, RTX_4090), or whose full name contains a table key; "cpu" measures this machine's matmul rate in
    cpu_dtype (the dtype a CPU run trains in: bfloat16 matmuls run several times faster on CPUs with AMX)."""
    if gpu.lower() == "cpu":
        return measured_cpu_flops(cpu_dtype)
    flops = gpu_lookup(GPU_PEAK_FLOPS, gpu)
    if flops is None:
        raise UserError(f"unknown --gpu={gpu!r}; known: cpu, {', '.join(k for k, _ in GPU_PEAK_FLOPS)}")
    return flops


def gpu_lookup(table, gpu: str):
    """The value of a (name, value) table for a GPU named as in it (case, spaces, dashes and underscores aside), or
    whose full name contains a table key (an exact name first: GH200 is not H200); None for an unknown GPU."""

    def plain(name: str) -> str:
        return "".join(c for c in name.lower() if c.isalnum())

    exact = [value for key, value in table if plain(key) == plain(gpu)]
    within = [value for key, value in table if plain(key) in plain(gpu)]
    return (exact + within + [None])[0]


def measured_cpu_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """This CPU's matmul FLOP/s in dtype, the best of a few n x n products: the peak a CPU run can approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def timed_cpu_step(train_argv: list[str], estimate_s: float, need_bytes: int) -> float | None:
    """Seconds per iteration of train.py's step (eager, random tokens) timed on this CPU, 2 burn-in steps and 3
    timed ones, when the estimated step is at most MEASURE_CPU_STEP_UP_TO_S and training fits in half the RAM; else
    None. On a CPU the non-matmul work (norms, attention, the optimizer) does not speed up with bf16's matmuls, so
    no one MFU holds."""
    ram = device_memory("cpu")
    if estimate_s > MEASURE_CPU_STEP_UP_TO_S or (ram is not None and need_bytes > ram // 2):
        return None
    return measure([*train_argv, "--device=cpu", "--compile=False"], burn_in=2, steps=3)["ms_per_iter"] / 1000


def report(
    cfg: types.SimpleNamespace, opts: SizingOptions, config: GPTConfig, train_argv: list[str] | None = None
) -> str:
    """The full sizing report as text, for train.py's resolved options cfg; for a CPU, train_argv (train.py's command
    line) lets it time the step."""
    model = build_meta_model(config)
    parts = param_counts(model)
    n = sum(parts.values())
    assert n == model.num_params(non_embedding=False), "param_counts must cover every parameter once"
    s, L, h = cfg.block_size, config.n_layer, config.n_embd
    flops_per_token = model.flops_per_token(s)
    causal_flops_per_token = flops_per_token - 6 * L * h * s
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * s
    flops_per_iter = flops_per_token * tokens_per_iter
    on_cpu = opts.gpu.lower() == "cpu"
    if on_cpu:
        cpu_dtype = pick_dtype(cfg.dtype, "cpu", training=True)  # what train.py would train in on this CPU
        peak, hardware = gpu_peak_flops("cpu", cpu_dtype), f"cpu, {str(cpu_dtype).removeprefix('torch.')}"
    else:
        peak, hardware = gpu_peak_flops(opts.gpu), opts.gpu
    tflops = f"{peak / 1e12:.0f}" if peak >= 1e13 else f"{peak / 1e12:.2f}"
    estimate_s = flops_per_iter / (opts.num_gpus * peak * opts.mfu)
    train_bytes = 16 * n + activation_bytes(config, cfg.batch_size, cfg.gradient_checkpointing, True)
    # timed for one process training the whole model (bench's step builds no LoRA adapters)
    can_time = on_cpu and train_argv is not None and opts.num_gpus == 1 and not cfg.lora_rank
    timed_s = timed_cpu_step(train_argv, estimate_s, train_bytes) if can_time else None
    step_s = timed_s or estimate_s
    fp32_s = None  # an untimed bf16 CPU run: at bf16's matmul peak the estimate came out 2.4-3x too fast; bf16 steps
    if on_cpu and not timed_s and cpu_dtype != torch.float32:  # took 0.6-0.7x the estimate at the fp32 rate instead
        fp32_s = flops_per_iter / (opts.num_gpus * gpu_peak_flops("cpu", torch.float32) * opts.mfu)
        step_s = fp32_s
    gib = 2**30
    # what is divided over which GPUs: ZeRO-1 the optimizer state, ZeRO-2 also the gradients, ZeRO-3 (fsdp) also the
    # weights, over all GPUs or, with hsdp, over each group of hsdp of them; with cpu_offload they sit in CPU memory
    stage = cfg.zero_stage or (3 if cfg.fsdp else 0)
    group = min(cfg.hsdp or opts.num_gpus, opts.num_gpus)
    divide = {part: group if stage >= least else 1 for part, least in (("weights", 2), ("grads", 2), ("adamw", 1))}
    where = ", CPU memory" if cfg.cpu_offload else ""
    name = {0: "", 1: "ZeRO-1", 2: "ZeRO-2", 3: "FSDP"}[stage]
    sharded = {part: f", {name} 1/{d}{where}" if d > 1 else where for part, d in divide.items()}
    compute_bytes = 4 if cfg.dtype == "float32" else 2  # the weights as all-gathered for compute (bf16 on GPUs)
    gathered = {2: n, 3: n / L}.get(stage, 0) * compute_bytes  # ZeRO-2: every block kept till backward; 3: one

    def row(label: str, value: str) -> str:
        return f"  {label:<50} {value:>16}"

    lines = ["parameters"]
    lines += [row(part, f"{count:,}") + f"  {count / n:6.1%}" for part, count in parts.items()]
    lines.append(row("total", f"{n:,}"))
    if config.n_expert:
        per_expert = sum(p.numel() for p in model.transformer.h[0].mlp.experts[0].parameters())
        lines.append(
            row("active per token (MoE)", f"{n - L * per_expert * (config.n_expert - config.n_expert_active):,}")
        )
    lines += [
        "compute",
        row("FLOPs per token, 6N + 12LCT", f"{flops_per_token:.4g}"),
        row("FLOPs per token, causal 6N + 6LCT", f"{causal_flops_per_token:.4g}"),
        row("tokens per iteration", f"{tokens_per_iter:,}"),
        row("FLOPs per iteration", f"{flops_per_iter:.4g}"),
        f"memory per GPU (micro-batch {cfg.batch_size} x {s} tokens)",
        row(f"weights (fp32){sharded['weights']}", f"{4 * n / divide['weights'] / gib:.2f} GiB"),
        row(f"gradients (fp32){sharded['grads']}", f"{4 * n / divide['grads'] / gib:.2f} GiB"),
        row(f"AdamW state (fp32, 2 per weight){sharded['adamw']}", f"{8 * n / divide['adamw'] / gib:.2f} GiB"),
    ]
    if gathered:
        label = "weights gathered, forward to backward" if stage == 2 else "weights gathered, one block at a time"
        lines.append(row(label, f"{gathered / gib:.2f} GiB"))
    if cfg.cpu_offload:
        on_gpu = gathered + activation_bytes(config, cfg.batch_size, cfg.gradient_checkpointing, True)
        lines.append(row("on the GPU: gathered weights + activations", f"{on_gpu / gib:.2f} GiB"))
    if cfg.lora_rank:  # only the adapters have gradients and AdamW state; the frozen weights stay as they are
        adapters = lora_params(model, cfg.lora_rank, parse_targets(cfg.lora_targets))
        lines += [
            row(f"with LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: adapters", f"{adapters:,}"),
            row("  weights + adapters' grads and AdamW", f"{(4 * n + 16 * adapters) / gib:.2f} GiB"),
            row("  full fine-tuning instead (16 B/weight)", f"{16 * n / gib:.2f} GiB"),
        ]
    for label, ckpt, flash in (
        ("activations, attention stored", False, False),
        ("activations, flash attention", False, True),
        ("activations, checkpointed layers", True, True),
    ):
        lines.append(row(label, f"{activation_bytes(config, cfg.batch_size, ckpt, flash) / gib:.2f} GiB"))
    planned = cfg.max_iters * tokens_per_iter
    lines += [
        f"time on {opts.num_gpus} x {hardware} ({tflops} TFLOP/s peak each, assumed MFU {opts.mfu:.0%})",
        row("step, estimated at the assumed MFU", f"{estimate_s * 1000:.1f} ms"),
    ]
    if fp32_s:
        lines.append(row("step at the float32 rate (used below)", f"{fp32_s * 1000:.1f} ms"))
    if timed_s:
        lines += [
            row("step, timed here (train.py's step, eager)", f"{timed_s * 1000:.1f} ms"),
            row("MFU reached", f"{flops_per_iter / (timed_s * peak):.0%}"),
        ]
    lines += [
        row("tokens per second", f"{tokens_per_iter / step_s:,.0f}"),
        row(f"{cfg.max_iters:,} iterations", f"{cfg.max_iters * step_s / 3600:.1f} hours"),
        "data (Hoffmann et al. 2022)",
        row("Chinchilla-optimal (20 per param)", f"{CHINCHILLA_TOKENS_PER_PARAM * n:,} tokens"),
        row("this run", f"{planned:,} tokens"),
        row("this run, tokens per parameter", f"{planned / n:.1f}"),
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(
            __doc__ + "\n" + describe_fields(SizingOptions) + "\n  and every train.py option (python train.py --help)"
        )
        return
    own = {f"--{name}" for name in SizingOptions.__dataclass_fields__}
    mine = [a for a in argv if a.partition("=")[0] in own]
    opts = parse_config(SizingOptions, mine)
    train_argv = [a for a in argv if a not in mine]
    cfg = resolve_options(TRAIN_PY, train_argv)
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if "gpu" not in opts.given and on_cpu:  # a run that would train on this CPU: size it for the CPU, not an A100
        opts.gpu = "cpu"
    if opts.num_gpus < 1 or not 0 < opts.mfu <= 1:
        raise UserError("--num_gpus must be >= 1 and --mfu in (0, 1]")
    if PRINT_CONFIG in argv:  # what would be sized: train.py's options and this tool's
        print(json.dumps(vars(cfg) | dataclasses.asdict(opts)))
        return
    vocab_size = cfg.vocab_size or dataset_vocab_size(os.path.join(cfg.data_root, cfg.dataset))
    print(
        report(
            cfg, opts, GPTConfig.from_options(vars(cfg), token_ids_needed(vocab_size, cfg.arch), pad_id=0), train_argv
        )
    )


if __name__ == "__main__":
    run_cli(main)
