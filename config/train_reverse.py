# An encoder-decoder (T5 v1.1's layout, tiny) that learns to reverse strings of 4 to 12 lowercase letters: the classic
# check that an encoder-decoder works end to end (the source is read both ways, the target generated causally while
# attending to it). Data: python prepare/reverse.py (5,000 training pairs, 500 held-out strings).
# Hardware: 2 CPU cores. Expected: exact match >= 0.99 on the held-out strings after 3000 iterations, about 3 minutes:
#   python sample.py --out_dir=out-reverse --start=FILE:<one string per line> --temperature=0

out_dir = "out-reverse"
eval_interval = 500
eval_iters = 10
log_interval = 100
always_save_checkpoint = False

dataset = "reverse"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 16  # 12 letters and </s>

arch = "encoder_decoder"
n_layer = 2  # and as many decoder blocks (n_dec_layer)
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_embedding = "t5"  # T5's relative-position buckets
norm = "rmsnorm"
mlp = "geglu"  # T5 v1.1's gated GELU
attn_scale = False  # T5's unscaled attention
tie_embeddings = False  # T5 v1.1's untied output layer

learning_rate = 2e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

compile = False
