# Evaluate OpenAI's GPT-2 (124M; n_layer=12, n_head=12, n_embd=768) on OpenWebText, then exit.
# Hardware: one GPU, a few minutes. Expected: train and val loss ~3.11 (nanoGPT's measurement).
# Needs the weights from the Hugging Face hub (or --init_from=<local HF directory>) and python prepare/openwebtext.py.
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = "gpt2"
