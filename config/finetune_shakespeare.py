# Fine-tune GPT-2 XL (1.5B) on tiny-shakespeare in the GPT-2 BPE, nanoGPT's recipe.
# Hardware: one GPU with 40+ GB (an A100 or H100): a few minutes. Expected: val loss ~3.3 to 3.5 after 20 iterations.
# Needs the GPT-2 weights from the Hugging Face hub (or --init_from=<local HF directory>).
# Data: python prepare/shakespeare.py

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"

dataset = "shakespeare"
init_from = "gpt2-xl"  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
