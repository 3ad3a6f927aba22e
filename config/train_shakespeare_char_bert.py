# An encoder (BERT-style masked-language model) on tiny-shakespeare, characters: the laptop recipe's size, trained to
# fill in masked characters from both sides. The same data as the GPT presets; sample.py fills in [MASK].
# Hardware: 2 CPU cores. Expected: val loss ~1.99 and masked characters predicted right ~0.44 after 2000
# iterations, about 3 minutes (the unigram baseline, always the most frequent character, a space, gets 0.149).
# Data: python prepare/shakespeare_char.py

out_dir = "out-shakespeare-char-bert"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

arch = "encoder"
mlm_probability = 0.15
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = True
norm_position = "post"  # BERT's layout: post-norm blocks and a norm on the embeddings
mlp = "gelu"

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # compiling costs more than it saves on a run this small
