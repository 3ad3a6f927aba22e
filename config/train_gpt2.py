# GPT-2 (124M) from scratch on OpenWebText, nanoGPT's recipe: 0.5M tokens per step, 300B tokens in total.
# Hardware: 8 GPUs (one 8xA100 40GB node: about 4 days to val loss ~2.85).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# Data: python prepare/openwebtext.py (arrives with the data issue; needs the network and ~54 GB of disk).

wandb_log = True
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
vocab_size = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster matmuls

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1
