# The laptop recipe (config/train_shakespeare_char_cpu.py) as a small Llama: RoPE, RMSNorm, SwiGLU, grouped-query
# attention (4 query heads sharing 2 key/value heads), untied embeddings, no biases.
# Hardware: 2 CPU cores, or anything else. Expected: see README (val loss after 2000 iterations, a few minutes).
# Data: python prepare/shakespeare_char.py

out_dir = "out-shakespeare-char-llama"
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
bias = False
pos_embedding = "rope"
norm = "rmsnorm"
mlp = "swiglu"  # hidden size 8/3 * 128 rounded up to 384, about the parameters of GELU's 4 * 128
n_kv_head = 2
tie_embeddings = False

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False
