"""Plan a run from a budget, and fit your own scaling law from a sweep of small runs.

    python tools/plan.py --gpu=A100 --gpu_hours=8                       # budget -> model, tokens, batch, LR, command
    python tools/plan.py --flops=1e18 --dataset=openwebtext --out=planned.py
    python tools/plan.py --dollars=200 --dollars_per_gpu_hour=2 --gpu=H100 --num_gpus=8 --pos_embedding=rope
    python tools/plan.py --hours=2 --num_gpus=8 --gpu=H100 --tokens_available=9e9
    python tools/plan.py --sweep --flops=3e11,1e12,3e12 --sizes=5 --dataset=shakespeare_char   # writes sweep.sh
    python tools/plan.py --fit out-sweep-*                              # fits L(N, D), writes scaling_law.json + png
    python tools/plan.py --law=scaling_law.json --flops=1e14 --dataset=shakespeare_char --gpu=cpu

Takes train.py's command line too (presets, then --key=value, resolved by train.py itself): what it pins (block_size,
dataset, the architecture switches, dtype, ...) stays; the plan sets n_layer, n_head, n_embd, batch_size,
gradient_accumulation_steps, learning_rate, min_lr, warmup_iters, max_iters and lr_decay_iters (refused as
--key=value; a preset's are replaced).

The rules, and where they come from:
  compute C         FLOPs = gpu_hours x 3600 x peak FLOP/s x mfu (--hours x --num_gpus GPU-hours; --dollars /
                    --dollars_per_gpu_hour GPU-hours); FLOPs per token as tools/sizing.py counts them, 6N + 12·L·h·s
                    (PaLM's appendix B), so C = that x D.
  model size        one dial, depth (n_layer): n_embd = aspect x depth, heads of head_size (nanochat's depth dial,
                    karpathy/nanochat; aspect 64 as nanochat's, head size 64 as GPT-2's, by default).
                    The depth chosen is the one whose tokens per parameter D/N, at D = C / FLOPs per token, is
                    nearest the target: 20 (Hoffmann et al. 2022, "Chinchilla", table 3), or with --law the one the
                    fitted law predicts the lowest loss for (engine/scaling_law.py). N counts every parameter,
                    embeddings included, as Hoffmann et al. counted theirs (Pearce & Song 2024).
  batch and LR      tokens per step 0.292 x C^0.3271 and peak learning rate 0.3118 x C^-0.125, DeepSeek's fits of
                    the optimal batch size and learning rate to compute (Bi et al. 2024, "DeepSeek LLM", eq. 1),
                    with C counted as they count it: M x D, M = 72·L·d² + 12·L·d·s for GPT-2's blocks (6 per
                    weight outside the embeddings and the output layer, and attention's 12·L·d·s; section 3.1),
                    the batch at most that, in whole sequences per GPU, and at most 1/50 of the run; min_lr a
                    tenth of it (Chinchilla's cosine to 10%).
  warmup            1% of the steps, at least 10 (GPT-3 and nanoGPT warm up for well under 1% of long runs; short
                    runs need a few steps more).
  micro-batch       the batch in the fewest accumulation steps whose micro-batch's activations (engine/memory.py's
                    formula, flash attention) and 16 bytes per parameter fit 80% of the GPU's memory (--gpu's, or
                    --gpu_memory_gb).
  data              D over the tokens available: the epochs. Past 4, repeated data is worth much less than fresh
                    (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
"""

import dataclasses
import glob
import itertools
import json
import math
import os
import shlex
import sys
import types
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np

from engine import scaling_law
from engine.checkpoint import find_checkpoint, model_config_from_meta, read_meta
from engine.configurator import describe_fields, parse_config, resolve_options
from engine.data import dataset_vocab_size, load_data
from engine.errors import UserError, run_cli
from engine.files import check_output, write_file
from engine.masking import token_ids_needed
from engine.memory import activation_bytes, device_memory
from engine.schemas import ScalingLawFile, check, read_json
from model import GPTConfig
from tools.sizing import SizingOptions, build_meta_model, gpu_lookup, gpu_peak_flops, report

TRAIN_PY = os.path.join(ROOT, "train.py")
PLANNED = ("n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr")
PLANNED += ("warmup_iters", "max_iters", "lr_decay_iters")
MAX_DEPTH = 128
MAX_EPOCHS = 4  # Muennighoff et al. 2023
GPU_MEMORY_GB = {  # per GPU, for the micro-batch; the larger of a GPU's variants (A100: 80 GB, V100: 32 GB)
    "H200": 141, "H100 PCIe": 80, "H100": 80, "GH200": 96, "B200": 192, "A100": 80, "A800": 80, "L40S": 48, "L40": 48,
    "L4": 24, "A10G": 24, "A10": 24, "A6000": 48, "RTX 4090": 24, "RTX 3090": 24, "V100": 32, "T4": 16,
}  # fmt: skip


@dataclass
class PlanOptions:
    gpu: str = "A100"  # a GPU name tools/sizing.py knows (H100, A100, RTX 4090, ...), or cpu (measured here)
    num_gpus: int = 1
    gpu_hours: float | None = None  # the budget in GPU-hours of --gpu
    hours: float | None = None  # the budget in wall-clock hours on --num_gpus GPUs
    dollars: float | None = None  # the budget in dollars, at --dollars_per_gpu_hour
    dollars_per_gpu_hour: float = 2.0
    flops: str | None = None  # the budget in FLOPs (1e18); with --sweep, the budgets of the sweep, comma-separated
    mfu: float = 0.4  # assumed model FLOPs utilisation
    tokens_available: str | None = None  # tokens of data: a count (9e9) or a prepared dataset's name under data_root
    tokens_per_param: float = 20.0  # the target D/N without a fitted law (Chinchilla's)
    aspect: int = 64  # n_embd per layer of depth
    head_size: int = 64
    gpu_memory_gb: float | None = None  # per GPU, for the micro-batch; none = --gpu's (a CPU: this machine's RAM)
    law: str | None = None  # a fit written by --fit: its compute-optimal size, and the loss to expect
    out: str | None = None  # also write the plan as a preset file (config/x.py)
    sweep: bool = False  # write an IsoFLOP sweep's train.py commands instead (Chinchilla's approach 2)
    sizes: int = 5  # models per budget in a sweep
    sweep_script: str = "sweep.sh"
    sweep_prefix: str = "out-sweep"  # each run's out_dir: <prefix>-<budget>-d<depth>
    fit: str | None = None  # run directories (or globs) of a finished sweep, comma-separated; `--fit dir...` too
    fit_out: str = "scaling_law.json"
    plot: str = "scaling_law.png"
    bootstrap: int = 100  # resamples for the fit's uncertainty


@dataclass
class Size:
    depth: int
    config: GPTConfig
    params: int
    flops_per_token: float
    deepseek_flops_per_token: float  # Bi et al.'s M for their rules' C: 72·L·d² + 12·L·d·s for GPT-2's blocks


def budget_flops(opts: PlanOptions, peak: float) -> float:
    """The budget in FLOPs, from whichever of --flops, --gpu_hours, --hours, --dollars was given (exactly one)."""
    given = [name for name in ("flops", "gpu_hours", "hours", "dollars") if getattr(opts, name) is not None]
    if len(given) != 1:
        raise UserError("give one budget: --flops, --gpu_hours, --hours (with --num_gpus) or --dollars")
    if opts.flops is not None:
        try:
            flops = float(opts.flops)
        except ValueError:
            raise UserError(f"--flops={opts.flops} is not a number of FLOPs (like 1e18)") from None
    else:
        gpu_hours = {"gpu_hours": opts.gpu_hours, "hours": (opts.hours or 0) * opts.num_gpus}.get(given[0])
        if given[0] == "dollars":
            if opts.dollars_per_gpu_hour <= 0:
                raise UserError("--dollars_per_gpu_hour must be > 0")
            gpu_hours = opts.dollars / opts.dollars_per_gpu_hour
        flops = gpu_hours * 3600 * peak * opts.mfu
    if not flops > 0 or not math.isfinite(flops):
        raise UserError(f"the budget must be more than 0 FLOPs, got {flops:g}")
    return flops


def size(depth: int, pins: dict, vocab_size: int, opts: PlanOptions) -> Size:
    """The model of this depth: n_embd = aspect x depth in heads of head_size, the rest as pinned."""
    n_embd = opts.aspect * depth
    options = pins | {"n_layer": depth, "n_embd": n_embd, "n_head": n_embd // opts.head_size}
    try:
        config = GPTConfig.from_options(options, vocab_size, pad_id=0)
    except ValueError as e:
        raise UserError(f"depth {depth} (n_embd {n_embd}, {n_embd // opts.head_size} heads): {e}") from None
    model = build_meta_model(config)
    per_token = model.flops_per_token(config.block_size)
    head = model.lm_head.weight.numel() if hasattr(model, "lm_head") else 0
    deepseek = per_token - 6 * head  # DeepSeek's M: 6 per weight outside the embeddings and output layer, + 12·L·d·s
    return Size(depth, config, model.num_params(non_embedding=False), per_token, deepseek)


class Sizes:
    """The models of the depth dial, depth 1 to MAX_DEPTH, each built (on the meta device) when first asked for."""

    def __init__(self, pins: dict, vocab_size: int, opts: PlanOptions):
        if opts.head_size < 1 or opts.aspect < 1 or opts.aspect % opts.head_size:
            raise UserError(
                "--aspect must be a multiple of --head_size (n_embd = aspect x depth, in heads of head_size)"
            )
        self.pins, self.vocab_size, self.opts, self.built = pins, vocab_size, opts, {}

    def __getitem__(self, depth: int) -> Size | None:
        """The model of this depth, or None where the pinned options rule it out (GQA's n_kv_head must divide the
        depth's heads)."""
        if depth not in self.built:
            try:
                self.built[depth] = size(depth, self.pins, self.vocab_size, self.opts)
            except UserError as e:
                self.built[depth], self.refused = None, getattr(self, "refused", e)
        return self.built[depth]

    def depths(self, first: int = 1):
        """The depths with a model, from first up."""
        return (self[depth] for depth in range(first, MAX_DEPTH + 1) if self[depth])

    def smallest(self) -> Size:
        found = next(self.depths(), None)
        if found is None:
            raise self.refused  # no depth at all: why the first one was refused
        return found


def best_size(flops: float, sizes: Sizes, opts: PlanOptions, law) -> Size:
    """The size nearest compute-optimal for the budget: the one the law predicts the lowest loss for, or D/N nearest
    tokens_per_param. Both fall then rise with depth (N grows, D/N shrinks), so the search stops at the first rise."""
    if law is not None:  # the loss the law predicts for this size trained on the budget's tokens
        distance = lambda s: law.loss(s.params, flops / s.flops_per_token)  # noqa: E731
    else:
        distance = lambda s: abs(math.log(flops / s.flops_per_token / s.params / opts.tokens_per_param))  # noqa: E731
    best = sizes.smallest()
    for candidate in sizes.depths(best.depth + 1):
        if distance(candidate) > distance(best):
            break
        best = candidate
    return best


def read_law(path: str) -> scaling_law.Law:
    """A fit --fit wrote (checked as any file from outside)."""
    fix = "write it with tools/plan.py --fit"
    law = check(ScalingLawFile, read_json(path, fix), path, fix)["law"]
    law = scaling_law.Law(**{name: law[name] for name in ("E", "A", "B", "alpha", "beta")})
    with np.errstate(all="ignore"):
        finite = all(math.isfinite(law.loss(n, n * 20)) for n in (1e3, 1e6, 1e9, 1e12))
    if not finite:
        raise UserError(f"{path}: its law gives no finite loss (overflow); {fix}")
    return law


def available_tokens(value: str | None, data_root: str) -> int | None:
    """--tokens_available: a count, or the train split of a prepared dataset under data_root."""
    if value is None:
        return None
    try:
        count = float(value)
    except ValueError:  # a dataset's name
        data = load_data(os.path.join(data_root, value), 1, splits=("train",))
        count = os.path.getsize(data.split_path("train")) // np.dtype(data.dtype).itemsize
    if not 1 <= count < 1e18:
        raise UserError(f"--tokens_available={value}: {count:g} tokens; give a positive count or a prepared dataset")
    return int(count)


def plan(flops: float, cfg, opts: PlanOptions, sizes: Sizes, law, peak: float, chosen=None) -> dict:
    """The planned train.py options for a budget of `flops` (for the `chosen` size, or the compute-optimal one), and
    what to expect of the run."""
    chosen = chosen or best_size(flops, sizes, opts, law)
    if chosen.depth == MAX_DEPTH:
        raise UserError(f"{flops:.3g} FLOPs wants a model deeper than {MAX_DEPTH} layers; raise --aspect")
    block = cfg.block_size
    tokens = flops / chosen.flops_per_token
    ratio = tokens / chosen.params
    least = sizes.smallest()
    if chosen.depth == least.depth and ratio < opts.tokens_per_param / 4:
        raise UserError(
            f"{flops:.3g} FLOPs is too small for any sensible model: even {least.depth} layer(s) of n_embd "
            f"{least.config.n_embd} ({least.params:,} parameters) would see {ratio:.1f} tokens per parameter; give at "
            f"least {least.flops_per_token * least.params * opts.tokens_per_param:.2g} FLOPs, or a smaller --aspect"
        )
    compute = chosen.deepseek_flops_per_token * tokens  # C as DeepSeek counts it, for their fits (eq. 1)
    batch_tokens = 0.292 * compute**0.3271
    learning_rate = 0.3118 * compute**-0.125
    target = min(batch_tokens, tokens / 50)
    per_gpu = max(1, int(target / block / opts.num_gpus))  # sequences; at most the target, but one per GPU at least
    memory = gpu_memory(opts)
    fits = lambda m: 16 * chosen.params + activation_bytes(chosen.config, m, False, True) <= 0.8 * memory  # noqa: E731
    largest = 1  # the largest micro-batch that fits, by bisection (activations grow with it)
    high = per_gpu + 1
    while high - largest > 1:
        middle = (largest + high) // 2
        largest, high = (middle, high) if fits(middle) else (largest, middle)
    steps = -(-per_gpu // largest)  # the fewest accumulation steps, then the micro-batch that fills them
    micro = per_gpu // steps
    accumulation = steps * opts.num_gpus  # the global count, as train.py takes it
    tokens_per_iter = accumulation * micro * block
    max_iters = max(1, round(tokens / tokens_per_iter))
    if max_iters < 10:
        least = flops * 10 / max_iters
        raise UserError(f"{flops:.3g} FLOPs is {max_iters} steps of {tokens_per_iter:,} tokens on {opts.num_gpus} "
                        f"GPU(s): too small to plan; give at least {least:.2g} FLOPs")  # fmt: skip
    options = {
        "n_layer": chosen.depth,
        "n_head": chosen.config.n_head,
        "n_embd": chosen.config.n_embd,
        "batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": float(f"{learning_rate:.3g}"),
        "min_lr": float(f"{learning_rate / 10:.3g}"),
        "warmup_iters": max(10, round(0.01 * max_iters)),
        "max_iters": max_iters,
        "lr_decay_iters": max_iters,
    }
    trained = max_iters * tokens_per_iter
    return {
        "options": options,
        "size": chosen,
        "tokens": trained,
        "flops": trained * chosen.flops_per_token,
        "hours": trained * chosen.flops_per_token / (opts.num_gpus * peak * opts.mfu) / 3600,
        "loss": float(law.loss(chosen.params, trained)) if law is not None else None,
        "tokens_per_param": trained / chosen.params,
        "batch_target": target,
    }


def largest_budget_for(tokens: float, flops: float, cfg, opts: PlanOptions, sizes: Sizes, law, peak: float):
    """The largest budget below `flops` whose plan reads at most `tokens` (bisection on log FLOPs), or None."""
    low, high = math.log(flops) - 30, math.log(flops)
    found = None
    for _ in range(40):
        middle = (low + high) / 2
        try:
            fits = plan(math.exp(middle), cfg, opts, sizes, law, peak)["tokens"] <= tokens
        except UserError:  # too small to plan
            fits = False
            low = middle
            continue
        if fits:
            found, low = math.exp(middle), middle
        else:
            high = middle
    return found


def gpu_memory(opts: PlanOptions) -> float:
    """Bytes of memory per GPU: --gpu_memory_gb, or the named GPU's, or a CPU's RAM."""
    if opts.gpu_memory_gb is not None:
        return opts.gpu_memory_gb * 2**30
    if opts.gpu.lower() == "cpu":
        return device_memory("cpu") or 8 * 2**30
    return (gpu_lookup(GPU_MEMORY_GB.items(), opts.gpu) or 80) * 2**30


def command(argv: list[str], options: dict, num_gpus: int, extra: dict | None = None) -> str:
    """The train.py command line: the user's own arguments (none of them planned ones: those are refused), then the
    plan's."""
    planned = [f"--{k}={v}" for k, v in (options | (extra or {})).items()]
    launch = ["torchrun", "--standalone", f"--nproc_per_node={num_gpus}"] if num_gpus > 1 else ["python"]
    return shlex.join([*launch, "train.py", *argv, *planned])


def print_plan(p: dict, cfg, opts: PlanOptions, argv: list[str], available: int | None, law_path: str | None):
    s = p["size"]
    hardware = f"{opts.num_gpus} x {opts.gpu}" if opts.gpu.lower() != "cpu" else "this CPU"
    print(f"budget {p['flops']:.3g} FLOPs: {p['hours']:.2f} hours on {hardware} at {opts.mfu:.0%} MFU")
    target = f"the law in {law_path}" if law_path else f"{opts.tokens_per_param:g} tokens per parameter"
    print(f"model: depth {s.depth}, n_embd {s.config.n_embd}, {s.config.n_head} heads: {s.params:,} parameters "
          f"(all, embeddings included), {s.flops_per_token:.3g} FLOPs per token (6N + 12LCT)")  # fmt: skip
    print(f"tokens: {p['tokens']:,}, {p['tokens_per_param']:.1f} per parameter (target: {target})")
    o = p["options"]
    per_step = o["batch_size"] * o["gradient_accumulation_steps"] * cfg.block_size
    print(f"batch: {o['batch_size']} x {o['gradient_accumulation_steps']} x {cfg.block_size} = {per_step:,} tokens per "
          f"step, {o['max_iters']:,} steps; learning rate {o['learning_rate']:g} (min {o['min_lr']:g}), warmup "
          f"{o['warmup_iters']}")  # fmt: skip
    if per_step > p["batch_target"] * 1.5:
        print(f"warning: one sequence per GPU is {per_step:,} tokens per step, over the {p['batch_target']:,.0f} this "
              "budget wants (DeepSeek's rule): fewer GPUs, or a shorter block_size, would train it better")  # fmt: skip
    if p["loss"] is not None:
        print(f"expected final loss: {p['loss']:.3f} (the fitted law)")
    if available is not None:
        epochs = p["tokens"] / available
        print(f"data: {available:,} tokens available; the plan reads {epochs:.2f} epoch(s)")
        if epochs > MAX_EPOCHS:
            fits = p.get("fits_data")
            budget = f", or plan for at most {fits:.2g} FLOPs" if fits else ""
            print(f"warning: the data is too small for this budget: past {MAX_EPOCHS} epochs repeated tokens are "
                  f"worth much less than fresh ones (Muennighoff et al. 2023); get more data{budget}")  # fmt: skip
    print("\n" + command(argv, o, opts.num_gpus))


def sweep(flops_list: list[float], cfg, opts: PlanOptions, sizes: Sizes, law, peak: float, argv) -> str:
    """An IsoFLOP sweep (Hoffmann et al.'s approach 2): at each budget, `sizes` depths around the compute-optimal
    one, each trained on the budget's tokens, evaluated once at its end. Returns the shell script."""
    lines = ["#!/bin/sh", "# an IsoFLOP sweep written by tools/plan.py; fit it with:", "#   python tools/plan.py "
             f"--fit '{opts.sweep_prefix}-*'", "set -e"]  # fmt: skip
    for flops in flops_list:
        center = best_size(flops, sizes, opts, law).depth
        below = list(itertools.takewhile(lambda s, c=center: s.depth < c, sizes.depths()))  # (GQA may skip depths)
        below = below[max(0, len(below) - opts.sizes // 2) :]
        for chosen in itertools.islice(itertools.chain(below, sizes.depths(center)), opts.sizes):
            options = plan(flops, cfg, opts, sizes, law, peak, chosen)["options"]
            steps = options["max_iters"]
            out_dir = f"{opts.sweep_prefix}-{flops:.3g}-d{chosen.depth}"
            extra = {"eval_interval": steps, "out_dir": out_dir, "log_interval": max(1, steps // 10)}
            lines.append(command(argv, options, opts.num_gpus, extra))
    return "\n".join(lines) + "\n"


def read_run(run_dir: str) -> dict:
    """A finished run's parameters N, tokens trained D and final val loss, from its newest checkpoint."""
    path = find_checkpoint(run_dir, log=lambda *a, **k: None)
    meta = read_meta(path)
    config = model_config_from_meta(meta, path)
    train = meta["train_config"]
    if meta.get("val_loss") is None or not math.isfinite(meta["val_loss"]):
        raise UserError(f"{run_dir}: its newest checkpoint has no val loss; let the run evaluate at its end")
    if train.get("max_iters") not in (None, meta["iter_num"]):
        raise UserError(f"{run_dir} has not finished (iteration {meta['iter_num']} of {train['max_iters']}); "
                        "finish it, or leave it out of --fit")  # fmt: skip
    if not train.get("batch_size") or not train.get("gradient_accumulation_steps") or train.get("batch_warmup_tokens"):
        raise UserError(f"{run_dir}: its checkpoint does not say how many tokens it trained on (a batch warm-up, or "
                        "no batch recorded); fit runs that the sweep wrote")  # fmt: skip
    if train.get("init_from", "scratch") not in ("scratch", "resume"):  # (a sweep's run resumed is still its own)
        raise UserError(f"{run_dir} started from {train['init_from']}, not from scratch; fit runs that the sweep wrote")
    tokens = meta["iter_num"] * train["batch_size"] * train["gradient_accumulation_steps"] * config.block_size
    model = build_meta_model(config)
    return {"run": run_dir, "checkpoint": os.path.realpath(path), "data": train.get("dataset"),
            "N": model.num_params(non_embedding=False), "D": tokens, "loss": meta["val_loss"],
            "C": tokens * model.flops_per_token(config.block_size)}  # fmt: skip


def fit_runs(run_dirs: list[str], opts: PlanOptions) -> None:
    runs = list({r["checkpoint"]: r for r in map(read_run, run_dirs)}.values())  # each run once
    datasets = sorted({str(r["data"]) for r in runs})
    if len(datasets) > 1:
        raise UserError(f"the runs trained on different datasets ({', '.join(datasets)}); fit one dataset's sweep")
    if len(runs) < 5:
        raise UserError(f"{len(runs)} finished run(s): the law has 5 constants, fit it on at least 5 (a sweep)")
    n, d, loss = (np.array([r[k] for r in runs], dtype=np.float64) for k in ("N", "D", "loss"))
    try:
        law = scaling_law.fit(n, d, loss)
    except ValueError as e:
        raise UserError(f"the fit failed ({e}): the runs may be too few, or too alike; sweep more sizes") from None
    laws = scaling_law.bootstrap(law, n, d, loss, opts.bootstrap)
    print(f"fitted L(N, D) = E + A/N^alpha + B/D^beta on {len(runs)} runs (90% bootstrap intervals, from the "
          f"{len(laws)} of {opts.bootstrap} resamples whose fit converged):")  # fmt: skip
    spread = {}
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = np.percentile([getattr(x, name) for x in laws], [5, 95]) if laws else (math.nan, math.nan)
        spread[name] = [float(low), float(high)] if laws else None
        print(f"  {name:<6} {getattr(law, name):>12.4g}   [{low:.4g}, {high:.4g}]")
    groups = budget_groups(runs)
    six_nd = [float(np.median([6 * r["N"] * r["D"] for r in members])) for _, members in groups]
    print("compute-optimal allocation at each sweep budget's C = 6ND (all parameters; the law's own C) and 100x:")
    for c in six_nd + [six_nd[-1] * 100]:
        n_opt, d_opt = law.optimal(c)
        ratios = [x.optimal(c)[1] / x.optimal(c)[0] for x in laws]
        low, high = np.percentile(ratios, [5, 95]) if ratios else (math.nan, math.nan)
        print(f"  6ND {c:9.3g}: N {n_opt:,.0f}, D {d_opt:,.0f}, {d_opt / n_opt:.1f} tokens per parameter "
              f"[{low:.1f}, {high:.1f}], loss {law.loss(n_opt, d_opt):.3f}")  # fmt: skip
    residual = loss - law.loss(n, d)
    print(f"fit residuals: rms {np.sqrt(np.mean(residual**2)):.4f}, max {np.max(np.abs(residual)):.4f} (loss units)")
    draw(groups, law, opts.plot)
    write_file(
        opts.fit_out, json.dumps({"law": dataclasses.asdict(law), "intervals_90": spread, "runs": runs}, indent=2)
    )
    print(f"wrote {opts.fit_out} (plan with --law={opts.fit_out}) and {opts.plot}")


def budget_groups(runs: list[dict]) -> list[tuple[float, list[dict]]]:
    """The runs grouped by compute: sorted by C, a run within 25% of the group's first joins it; each group's budget
    is its runs' median C."""
    groups: list[list[dict]] = []
    for run in sorted(runs, key=lambda r: r["C"]):
        if groups and run["C"] <= groups[-1][0]["C"] * 1.25:
            groups[-1].append(run)
        else:
            groups.append([run])
    return [(float(np.median([r["C"] for r in g])), g) for g in groups]


def draw(groups: list[tuple[float, list[dict]]], law, path: str) -> None:
    """IsoFLOP curves (loss against N at each budget: the runs, the law's curve) and the fitted frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = [budget for budget, _ in groups]
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    for c, color in zip(budgets, colors, strict=True):
        mine = next(members for budget, members in groups if budget == c)
        left.scatter([r["N"] for r in mine], [r["loss"] for r in mine], color=color, label=f"{c:.2g} FLOPs")
        ns = np.geomspace(min(r["N"] for r in mine) / 1.5, max(r["N"] for r in mine) * 1.5, 100)
        if len(mine) > 1:  # the tokens the budget buys at each size, as its runs had them (log D linear in log N)
            slope, offset = np.polyfit(np.log([r["N"] for r in mine]), np.log([r["D"] for r in mine]), 1)
            curve = law.loss(ns, np.exp(offset + slope * np.log(ns)))
            left.plot(ns, curve, color=color, lw=1)
            left.scatter([ns[curve.argmin()]], [curve.min()], color=color, marker="*", s=120, edgecolor="k")
    left.set(xscale="log", xlabel="parameters N", ylabel="final val loss", title="IsoFLOP curves (* the law's optimum)")
    left.legend(fontsize=8)
    best = [min(members, key=lambda r: r["loss"]) for _, members in groups]
    cs = np.geomspace(min(6 * r["N"] * r["D"] for r in best) / 3, max(6 * r["N"] * r["D"] for r in best) * 100, 50)
    right.plot(cs, [law.optimal(c)[0] for c in cs], color="k", label="N_opt(C), fitted")
    for c, run, color in zip(budgets, best, colors, strict=True):
        right.scatter([6 * run["N"] * run["D"]], [run["N"]], color=color, label=f"best run at {c:.2g}")
    right.set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)", ylabel="parameters", title="compute-optimal N")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + describe_fields(PlanOptions) + "\n  and every train.py option (python train.py --help)")
        return
    if "--fit" in argv:  # `--fit out-sweep-*`: the shell's expansion, a list of directories
        at = argv.index("--fit")
        rest = argv[at + 1 :]
        dirs = list(itertools.takewhile(lambda a: not a.startswith("--"), rest))
        argv = argv[:at] + [f"--fit={','.join(dirs)}"] + rest[len(dirs) :]
    if "--sweep" in argv:
        argv[argv.index("--sweep")] = "--sweep=True"
    own = {f"--{name}" for name in PlanOptions.__dataclass_fields__}
    mine = [a for a in argv if a.partition("=")[0] in own]
    opts = parse_config(PlanOptions, mine)
    train_argv = [a for a in argv if a not in mine]
    if opts.num_gpus < 1 or not 0 < opts.mfu <= 1 or not 1 <= opts.sizes <= 16 or opts.bootstrap < 0:
        raise UserError("--num_gpus must be >= 1, --sizes 1 to 16, --bootstrap >= 0 and --mfu in (0, 1]")
    if not 0 < opts.tokens_per_param < 1e6:
        raise UserError(f"--tokens_per_param must be > 0, got {opts.tokens_per_param}")
    if opts.gpu_memory_gb is not None and not opts.gpu_memory_gb > 0:
        raise UserError(f"--gpu_memory_gb must be > 0, got {opts.gpu_memory_gb}")
    outputs = {"--fit_out": opts.fit_out, "--plot": opts.plot} if opts.fit is not None else {}
    outputs |= {"--sweep_script": opts.sweep_script} if opts.sweep else {"--out": opts.out} if opts.out else {}
    for flag, path in outputs.items():  # before any work: nothing is written when one cannot be
        check_output(path, flag)
    inputs = {"--law": opts.law} if opts.law else {}
    paths = {os.path.realpath(path): flag for flag, path in (inputs | outputs).items()}
    if len(paths) < len(inputs | outputs):
        raise UserError(f"{', '.join(inputs | outputs)} must be different files")
    if opts.fit is not None:
        from matplotlib.figure import Figure

        kind = os.path.splitext(opts.plot)[1].removeprefix(".").lower()
        if kind not in Figure().canvas.get_supported_filetypes():
            raise UserError(f"--plot={opts.plot}: name a picture matplotlib writes (.png, .svg, .pdf)")
    if opts.sweep and any(getattr(opts, name) is not None for name in ("gpu_hours", "hours", "dollars")):
        raise UserError("--sweep takes each run's budget as --flops (like 1e12,3e12), not hours or dollars")
    if opts.fit is not None:
        dirs = [d for pattern in opts.fit.split(",") if pattern for d in sorted(glob.glob(pattern)) or [pattern]]
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing or not dirs:
            raise UserError(f"no run directory {missing[0] if missing else opts.fit!r}; give the sweep's out_dirs")
        return fit_runs(dirs, opts)
    pinned = [a.removeprefix("--").partition("=")[0] for a in train_argv]
    clash = [k for k in PLANNED if k in pinned]
    if clash:  # what the plan chooses is its answer, not a setting: never replaced in silence
        raise UserError(f"the plan chooses {', '.join(clash)}: pin --aspect or --head_size for the shape, "
                        "--gpu_memory_gb for the micro-batch, or edit the printed command")  # fmt: skip
    if opts.sweep and opts.out:
        raise UserError("--out writes one plan's preset; a sweep's commands go to --sweep_script")
    law = read_law(opts.law) if opts.law else None
    peak = gpu_peak_flops(opts.gpu)  # a CPU's float32 rate whatever the dtype: bf16 CPU steps ran near it (sizing.py)
    if opts.sweep:
        if opts.flops is None:
            raise UserError("--sweep needs --flops: the budget of each run, comma-separated for several")
        try:
            budgets = [float(f) for f in opts.flops.split(",") if f]
        except ValueError:
            budgets = []
        names = {f"{f:.3g}" for f in budgets}  # each budget's runs are named by 3 digits
        if not budgets or not all(0 < f < math.inf for f in budgets) or len(names) < len(budgets):
            raise UserError(f"--flops={opts.flops}: give the sweep's budgets in FLOPs, each more than 0 and different "
                            "in its first 3 digits (like 1e12,3e12)")  # fmt: skip
    else:
        flops = budget_flops(opts, peak)
    cfg = resolve_options(TRAIN_PY, train_argv)
    vocab_size = cfg.vocab_size or dataset_vocab_size(os.path.join(cfg.data_root, cfg.dataset))
    sizes = Sizes(vars(cfg), token_ids_needed(vocab_size, cfg.arch), opts)
    if opts.sweep:
        write_file(opts.sweep_script, sweep(budgets, cfg, opts, sizes, law, peak, train_argv), mode=0o755)
        print(f"wrote {opts.sweep_script}: {len(budgets) * opts.sizes} runs, {sum(budgets) * opts.sizes:.3g} FLOPs in "
              f"all; run it, then python tools/plan.py --fit '{opts.sweep_prefix}-*'")  # fmt: skip
        return
    available = available_tokens(opts.tokens_available, cfg.data_root)
    if available is None and os.path.isfile(os.path.join(cfg.data_root, cfg.dataset, "meta.json")):
        available = available_tokens(cfg.dataset, cfg.data_root)  # the dataset the run would train on
    p = plan(flops, cfg, opts, sizes, law, peak)
    if available is not None and p["tokens"] > MAX_EPOCHS * available:
        p["fits_data"] = largest_budget_for(available * MAX_EPOCHS, flops, cfg, opts, sizes, law, peak)
    print_plan(p, cfg, opts, train_argv, available, opts.law)
    planned = types.SimpleNamespace(**(vars(cfg) | p["options"]))
    sizing = SizingOptions(gpu=opts.gpu, num_gpus=opts.num_gpus, mfu=opts.mfu)
    print("\nsizing of the planned run (tools/sizing.py):\n" + report(planned, sizing, p["size"].config))
    if opts.out:  # a preset: what the command line (its presets included) changed from train.py's defaults, the plan
        defaults = vars(resolve_options(TRAIN_PY, []))
        pinned = {k: v for k, v in vars(cfg).items() if k not in PLANNED and defaults.get(k) != v}
        lines = [f"# planned by tools/plan.py: {p['flops']:.3g} FLOPs on {opts.num_gpus} x {opts.gpu}\n"]
        lines += [f"{k} = {v!r}\n" for k, v in (pinned | p["options"]).items()]
        write_file(opts.out, "".join(lines))
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    run_cli(main)
