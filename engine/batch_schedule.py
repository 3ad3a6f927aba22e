"""The batch schedule: which token windows each micro-step of each rank reads (Batches), and how many micro-steps each
optimizer step takes (BatchWarmup).

Windows depend only on (seed, iteration, global micro-step, rollbacks so far), so a resumed run reads the batches an
uninterrupted one reads, W ranks of M micro-steps read exactly what one process of W * M reads, and a rollback moves
on to windows the spike never saw. Rank r takes the contiguous global micro-steps r * M onwards.

Batch-size warmup (train.py --batch_warmup_tokens): the global batch grows, in whole micro-steps of gradient
accumulation, from a small start to the configured gradient_accumulation_steps over the first N tokens, as GPT-3
and Megatron-LM's --rampup-batch-size do (early on, small batches make the same progress per token for less compute).

The batch of an optimizer step is a function of the tokens trained before it, so a resumed run (which restores that
count) takes the same steps. The learning-rate schedule and the end of the run count full batches' worth of steps:
a step of m of the full G micro-steps advances them by m / G, so warmup_iters, lr_decay_iters and max_iters keep
meaning what they mean without warmup, and the run trains exactly max_iters full batches' worth of tokens in more
steps: the last step takes only the micro-steps that are left.
"""

import dataclasses
import math
from dataclasses import dataclass

from engine import masking, seq2seq
from engine.classify import Labelled
from engine.data import get_batch, target_count, train_key
from engine.errors import UserError
from engine.masking import Masking
from engine.runtime import teardown_runtime
from engine.seq2seq import Pairs, SpanCorruption

DONE = 1e-9  # a run whose progress is within this of max_iters is done (progress sums fractions m / G)


@dataclass(frozen=True)
class BatchWarmup:
    full: int  # global micro-steps of a full batch: gradient_accumulation_steps
    start: int  # global micro-steps of the first steps; the batch grows in multiples of it
    tokens: int  # the ramp's length in tokens trained; 0 = no warmup
    micro_tokens: int  # tokens of one global micro-step: batch_size * block_size
    max_iters: int = 0  # the run's length in full batches: its last step stops there; 0 = no end

    def micro_steps(self, tokens_seen: int, progress: float) -> int:
        """Global micro-steps of the optimizer step that follows tokens_seen tokens (progress full batches): linear
        in tokens_seen from start to full over the ramp, rounded down to a multiple of start (exact integer
        arithmetic), and never past the end of the run: a step that would overshoot max_iters full batches takes
        only what is left, rounded up to a multiple of start (so of the processes too). What is left is counted in
        full batches of this run, so a resume with another batch shape still ends at max_iters."""
        m = self.full
        if tokens_seen < self.tokens:
            grown = self.start * self.tokens + (self.full - self.start) * tokens_seen  # (start..full) * self.tokens
            m = min(self.full, self.start * (grown // (self.start * self.tokens)))
        left = round((self.max_iters - progress) * self.full)  # progress sums fractions m / full: round, not floor
        return min(m, -(-left // self.start) * self.start) if self.max_iters and left > 0 else m

    def advance(self, tokens_seen: int, progress: float) -> tuple[int, int, float]:
        """(this step's global micro-steps, the tokens and the progress after it)."""
        m = self.micro_steps(tokens_seen, progress)
        return m, tokens_seen + m * self.micro_tokens, progress + m / self.full

    def steps_left(self, tokens_seen: int, progress: float) -> int:
        """Optimizer steps from here until max_iters full batches' worth of progress."""
        steps = 0
        while tokens_seen < self.tokens and not done(progress, self.max_iters):
            _, tokens_seen, progress = self.advance(tokens_seen, progress)
            steps += 1
        return steps + max(0, math.ceil(self.max_iters - progress - DONE))


def check_process_count(gradient_accumulation_steps: int, batch_warmup_start: int | None, rt, fsdp=False) -> None:
    """gradient_accumulation_steps is global: it must split evenly over the processes, and so must every step of
    batch warmup. fsdp shards over the processes of a torchrun job: one process alone has none to shard over."""
    if fsdp and not rt.ddp:
        raise UserError(
            "fsdp=True (zero_stage 2 or 3) shards over the processes of a torchrun job: launch with "
            "`torchrun --standalone --nproc_per_node=N train.py ...`, or drop it"
        )
    for name, value in (
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("batch_warmup_start", batch_warmup_start),
    ):
        if value is not None and value % rt.world_size != 0:
            teardown_runtime(rt)  # every rank stops here, together
            raise UserError(f"{name}={value} is not divisible by the {rt.world_size} processes; make it a multiple")


def batch_objective(arch: str, data, mlm_probability: float, objective: str | None = None):
    """What train.py's batches are for `arch` on `data`: None for a decoder (token windows, or chat's conversations);
    an encoder's masked text (engine/masking.py) on token files, or labelled texts (engine/classify.py) on a
    classification dataset; an encoder-decoder's pairs (engine/seq2seq.py), or with objective="span_corruption" T5's
    corrupted spans of token files. Data of the wrong kind is one line."""
    name = data.data_dir
    if data.classify and arch != "encoder":
        raise UserError(f"{name} is a classification dataset: fine-tune an encoder on it (--arch=encoder)")
    if data.seq2seq and arch != "encoder_decoder":
        raise UserError(f"{name} holds source-target pairs: train an encoder-decoder on it (--arch=encoder_decoder)")
    if arch == "decoder":
        return None
    if data.chat:
        raise UserError(f"{name} is a chat dataset, for decoders; an {arch.replace('_', '-')} cannot train on it")
    if objective == "span_corruption":
        if data.seq2seq or data.classify:
            raise UserError(f"{name} is not plain text: span_corruption pretrains on token files (prepare/text.py)")
        return SpanCorruption(seq2seq.special_tokens(data.meta["vocab_size"], data.meta.get("tokenizer_json"), True))
    if arch == "encoder_decoder":
        if not data.seq2seq:
            raise UserError(f"{name} holds no pairs: an encoder-decoder trains on prepare/seq2seq.py's datasets")
        return Pairs(data, data.seq2seq["special"])
    special = masking.special_tokens(data.meta["vocab_size"], data.meta.get("tokenizer_json"))
    return Labelled(special) if data.classify else Masking(data.meta["vocab_size"], mlm_probability, special)


def done(progress: float, max_iters: int) -> bool:
    return progress >= max_iters - DONE


class Batches:
    """This rank's training batches: `data` in micro-batches of batch_size windows of block_size tokens; an encoder's
    masked or labelled (objective: engine/masking.py's Masking or engine/classify.py's Labelled; else None)."""

    def __init__(self, data, batch_size: int, block_size: int, seed: int, warmup: BatchWarmup, rt, objective=None):
        self.data, self.batch_size, self.block_size, self.seed, self.warmup = data, batch_size, block_size, seed, warmup
        self.rank, self.world_size, self.device, self.objective = rt.rank, rt.world_size, rt.device, objective

    def get(self, it: int, g: int, rollbacks: int = 0):
        """The batch (x, y) of global micro-step g of iteration it."""
        key = train_key(self.seed, it, g, rollbacks)
        batch = self.objective.batch if self.objective else get_batch
        return batch(self.data, "train", self.batch_size, self.block_size, key, self.device)

    def first(self, loop):
        """This rank's first batch of the step at `loop` (a LoopState): global micro-step rank * its micro-steps."""
        per_rank = self.warmup.micro_steps(loop.tokens, loop.progress) // self.world_size
        return self.get(loop.iter_num, self.rank * per_rank, loop.rollbacks)

    def after(self, loop, micro_step: int, accum_steps: int, tokens_after: int, progress_after: float):
        """The batch after this rank's micro_step of accum_steps: its next micro-step's, or after the last one the
        next iteration's first (whose micro-step count follows the tokens and progress once this step is done)."""
        if micro_step + 1 < accum_steps:
            return self.get(loop.iter_num, self.rank * accum_steps + micro_step + 1, loop.rollbacks)
        upcoming = dataclasses.replace(loop, iter_num=loop.iter_num + 1, tokens=tokens_after, progress=progress_after)
        return self.first(upcoming)

    def targets(self, loop, micro_steps: int) -> int | None:
        """The targets the loss counts in the step's global batch, over every rank and micro-step, where batches hold
        different numbers of them (chat data: the assistant's tokens; an encoder's: the masked ones, or its labels);
        None for plain text, whose every token is a target."""
        if not (self.data.chat or self.objective):
            return None
        keys = [train_key(self.seed, loop.iter_num, g, loop.rollbacks) for g in range(micro_steps)]
        if self.objective:
            return sum(self.objective.count(self.batch_size, self.block_size, key) for key in keys)
        return sum(target_count(self.data, "train", self.batch_size, self.block_size, key) for key in keys)
