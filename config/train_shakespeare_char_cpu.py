# nanoGPT's README laptop recipe as a preset: a 0.8M-parameter character GPT on tiny-shakespeare that trains on a
# laptop CPU (and on any other device; pass --device=cpu to force the CPU).
# Hardware: 2 CPU cores. Expected: val loss ~1.88 after 2000 iterations, about 2 minutes.
# Data: python prepare/shakespeare_char.py

out_dir = "out-shakespeare-char-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 1
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
mlp = "gelu"  # the exact GELU of nanoGPT's model; GPT-2's tanh approximation costs ~4x more on CPUs

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # compiling costs more than it saves on a run this small
