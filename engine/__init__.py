"""What train.py, sample.py and the tools stand on, one concept per module. Each imports only model.py and the
modules listed above it:

interrupts     Ctrl-C at any moment as one line and exit code 130; how a command ends; workers that die with it
errors         one-line user errors and the exit codes
files          writing files whole, never through a symlink, only where they belong
configurator   dataclass config from presets and --key=value
runtime        device, dtype, torchrun, seeds, stop signals
chat           the chat template, its special tokens and the loss mask
schemas        the shape of every file we read but may not have written, checked before use
tokenization   tiktoken / character / tokenizer.json encodings
data           token datasets on disk and the (seed, iteration, micro-step) batches
batch_schedule which windows each micro-step reads, and the global batch's growth over the first tokens
memory         parameter and activation bytes, the fits-in-memory check, the out-of-memory line
fp8            FP8 matmuls in the blocks' Linear layers (torchao)
lora           low-rank adapters of a frozen model, and merging them in
ema            the moving average of the weights
attention      attention probabilities recomputed from the model's own modules
health         per-layer training telemetry
optim          AdamW / Muon parameter groups and the LR schedules
fsdp           FSDP2 sharding and its state dicts (each rank's shards, or whole)
sharded_checkpoint  every rank's shards written and read with torch.distributed.checkpoint, its index read safely
checkpoint     the only reader and writer of checkpoints
out_dir_lock   one training run per out_dir, across all its ranks
train_state    what a run holds (model, optimizers, scaler, EMA, counters, LoRA), saved and restored as one
rollback       bad steps: non-finite skips, loss spikes, rollbacks, and when to stop
hf_interop     Hugging Face GPT-2 / Llama weights in and out
inference      a trained model and its tokenizer, ready to use
generate       the KV-cache decode loop, sampling, streaming text
batching       continuous batching: many requests decoded together, each row at its own position
server         the HTTP API serve.py runs (OpenAI's completions and chat completions) and the chat page
tasks          multiple-choice benchmarks scored by log-likelihood
loss_curve     loss_curve.png from metrics.jsonl
scaling_law    L(N, D) fitted to runs, and the compute-optimal allocation it gives
run_log        console lines, metrics.jsonl, wandb, the loss curve, step times and the ETA
"""
