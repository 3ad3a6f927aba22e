# The laptop recipe (config/train_shakespeare_char_cpu.py) with Mixture-of-Experts MLPs: 4 experts per layer, each
# token routed to its top 2, plus the load-balancing loss (logged as "aux loss").
# Hardware: 2 CPU cores, or anything else. Expected: see README (val loss after 2000 iterations, a few minutes).
# Data: python prepare/shakespeare_char.py

out_dir = "out-shakespeare-char-moe"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
n_expert = 4
n_expert_active = 2
moe_aux_loss_coef = 0.01

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False
