"""Where and how the code runs: device (cuda -> mps -> cpu), precision, torchrun/DDP, seeding, rank-0 printing.

Nothing here knows about data; of a model, only how to wrap it to train (wrap: compiled, then DDP). train.py and
sample.py call `setup_runtime` once.
"""

import contextlib
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name(). Used for MFU; `peak_flops` in the config overrides it for anything else.
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


@dataclass
class Runtime:
    device: str  # e.g. "cuda:0", "mps", "cpu"
    device_type: str  # "cuda", "mps" or "cpu"
    dtype: torch.dtype  # compute dtype under autocast; parameters stay float32
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Mixed-precision context for forward passes; a no-op in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


def pick_device(requested: str) -> str:
    """'auto' -> cuda, then mps, then cpu; anything else is used as given (after checking it exists)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={requested} but CUDA is not available here; use --device=cpu or --device=auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={requested} but MPS is not available here; use --device=cpu or --device=auto")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return requested


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX, Sapphire Rapids and newer)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def pick_dtype(requested: str, device_type: str, training: bool = False) -> torch.dtype:
    """'auto' -> bfloat16 where the hardware runs it natively: GPUs from Ampere on, and for training CPUs with AMX;
    float16 with a GradScaler on older CUDA GPUs; float32 elsewhere."""
    if requested == "auto":
        if device_type == "cuda":
            # Only native bf16 (Ampere and newer): V100 and T4 emulate it slowly, so they get float16 + GradScaler.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device_type == "cpu" and training and native_bf16_cpu():
            # AMX runs bf16 matmuls ~2x faster than fp32 ones (training steps 1.3-1.5x faster here); decoding is
            # bound by memory and latency rather than matmuls, and a small model decodes slower in bf16 on CPUs
            return torch.bfloat16
        return torch.float32
    if requested not in DTYPES:
        raise UserError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
    if requested == "float16" and device_type == "cpu":
        raise UserError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return DTYPES[requested]


def setup_runtime(device: str = "auto", dtype: str = "auto", backend: str = "auto", training: bool = False) -> Runtime:
    """Pick device and dtype (training: train.py's choice of dtype=auto); under torchrun (RANK in the environment)
    join the process group, one GPU per rank."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device = pick_device(device)
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if backend == "auto":  # on GPUs NCCL, and gloo for CPU tensors (FSDP's offloaded shards, as torchtitan does)
            backend = "cuda:nccl,cpu:gloo" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for float32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    chosen = pick_dtype(dtype, device_type, training)
    if ddp and dtype == "auto" and device_type == "cpu":  # CPUs of a job may differ: bf16 only where all have AMX
        native = torch.tensor([int(chosen == torch.bfloat16)])
        dist.all_reduce(native, op=dist.ReduceOp.MIN)
        chosen = torch.bfloat16 if native.item() else torch.float32
    return Runtime(device, device_type, chosen, ddp, rank, local_rank, world_size)


def teardown_runtime(rt: Runtime) -> None:
    """Leave the process group: a barrier so that no rank tears down while another still talks to it. gloo's worker
    threads may outlive this (DDP keeps the process group referenced), so the process must not end through the
    interpreter's finalization, where such a thread dropping its last tensor aborts it (SIGABRT, "terminate called
    without an active exception"): run_cli ends it with engine/interrupts.py end_process."""
    if rt.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def trace_data_dependent_shapes() -> None:
    """Let torch.compile trace ops whose output size depends on the data (an MoE's torch.where over its routing)
    with symbolic sizes, instead of breaking the graph there and recompiling each expert for every new token count.
    Read when a graph is traced, so call it before the first compiled forward."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the only randomness the training code uses)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def hash_seed(*key: int) -> int:
    """A 63-bit seed mixed from integers, so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)


def wrap(raw_model, compile: bool, sharded: bool, rt) -> tuple:
    """(the model to train, the model to evaluate): torch.compile'd unless off (under FSDP its blocks already are),
    then DDP under torchrun (not FSDP: the model is sharded in place). Evaluation needs no gradient sync: no DDP."""
    model = raw_model
    if compile:  # before the first compiled forward, under FSDP too (its blocks are compiled, not yet traced)
        trace_data_dependent_shapes()
    if compile and not sharded:
        rt.print0("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if rt.ddp and not sharded:
        return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None), model
    return model, model


def peak_flops(rt: Runtime, override: float | None) -> float | None:
    """Peak FLOP/s of this device for MFU: the override if given, else the GPU table, else None (unknown)."""
    if override:
        return override
    if rt.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(rt.device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None


class StopSignals:
    """Turns SIGTERM and SIGUSR1 (SLURM's usual warning before preemption), SIGINT (Ctrl-C) and SIGHUP (a closed
    terminal) into a flag the training loop polls, so it can finish the step, checkpoint and exit. A second Ctrl-C
    raises KeyboardInterrupt at once, wherever the loop is: the checkpoint being written stays a temporary directory
    that readers ignore and the next run clears, so the newest complete one is kept. Wherever that interrupt surfaces
    (out of main(), in a finalizer, while the process ends) it is one line and exit code 130 (engine/interrupts.py).
    restore(), or leaving a `with` block, puts the previous handlers back."""

    CODES = {signal.SIGTERM: EXIT_PREEMPTED, signal.SIGUSR1: EXIT_PREEMPTED}
    CODES |= {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGHUP: EXIT_INTERRUPTED}

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in self.CODES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def exit_code(self, rt: Runtime) -> int:
        """0, or the exit code for the signal received (EXIT_PREEMPTED or EXIT_INTERRUPTED); the same on every rank
        when any rank got a signal, so all ranks stop after the same step."""
        code = self.CODES.get(self.received, 0)
        if rt.ddp:
            t = torch.tensor([code], device=rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return code
