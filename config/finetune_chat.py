# Fine-tune a pretrained GPT for conversation with LoRA, on a chat dataset from prepare/chat.py (the loss counts the
# assistant's tokens only). Hardware: one GPU. GPT-2 (124M) trains in minutes; with --init_from=gpt2-xl LoRA keeps
# optimizer state for the adapters alone (python tools/sizing.py config/finetune_chat.py --n_layer=48 --n_head=25
# --n_embd=1600 estimates the memory): the 1.5B model's weights take 6 GiB, full AdamW training 23 GiB plus.
# Data:  python prepare/chat.py --input=<conversations.jsonl or a hub dataset> --out=data/chat
# Then:  python sample.py --out_dir=out-chat --chat=True

out_dir = "out-chat"
dataset = "chat"
init_from = "gpt2"  # or gpt2-medium/large/xl, a Hugging Face directory, or the out_dir of one of your runs

lora_rank = 16
lora_alpha = 32
lora_targets = "attn,mlp"

block_size = 1024  # prepare/chat.py's --block_size: conversations longer than this were truncated there
batch_size = 4  # conversations per micro-step (each padded to block_size)
gradient_accumulation_steps = 8
max_iters = 1000
eval_interval = 100
eval_iters = 20
always_save_checkpoint = False  # keep the best by val loss (and the last)

learning_rate = 2e-4  # LoRA takes larger rates than full fine-tuning
min_lr = 2e-5
warmup_iters = 50
weight_decay = 0.0
dropout = 0.0
